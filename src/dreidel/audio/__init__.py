"""dreidel.audio"""
