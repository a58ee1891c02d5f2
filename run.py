"""Phase 12 command line: `python run.py --help` (the commands are phase12.cli's)."""

import sys

from phase12.cli import main

if __name__ == "__main__":
    sys.exit(main())
