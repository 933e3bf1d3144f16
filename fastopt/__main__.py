"""`python -m fastopt ...`: the same command line as the `fastopt` script (fastopt/cli.py)."""
import sys

from fastopt.cli import main

if __name__ == "__main__":
    sys.exit(main())
