"""``python -m dreidel``: the ``dreidel`` console script, where it is not on PATH."""

import sys

from dreidel.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
