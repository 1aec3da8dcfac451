"""``python -m dreidel``: the ``dreidel`` console script, where it is not on PATH."""

import sys

from dreidel.cli.main import main

sys.exit(main())
