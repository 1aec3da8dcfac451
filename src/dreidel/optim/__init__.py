"""dreidel.optim"""
