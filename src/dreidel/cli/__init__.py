"""The `dreidel` command line: `dreidel info`, `dreidel demo`, ..."""
