"""`python -m dalpsr ...` (and `accelerate launch -m dalpsr ...`): the `dalpsr` command line."""

import sys

from dalpsr.cli import main

if __name__ == "__main__":
    sys.exit(main())
