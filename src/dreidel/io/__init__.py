"""dreidel.io"""
