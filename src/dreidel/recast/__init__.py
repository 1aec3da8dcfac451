"""dreidel.recast"""
