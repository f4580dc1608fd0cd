"""`python -m audit`: the command line (see audit/cli.py)."""

import sys

from audit.cli import main

sys.exit(main(prog="python -m audit"))
