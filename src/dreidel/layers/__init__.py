"""dreidel.layers"""
