"""dreidel.models"""
