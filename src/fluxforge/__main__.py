"""`python -m fluxforge`: the command line (fluxforge.cli)."""

import sys

from fluxforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
