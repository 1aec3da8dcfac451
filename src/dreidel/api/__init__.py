"""dreidel.api"""
