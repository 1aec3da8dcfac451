"""dreidel.data"""
