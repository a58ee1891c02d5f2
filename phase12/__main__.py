"""`python -m phase12 ...`: the command line (phase12.cli), as `python run.py ...`."""

import sys

from phase12.cli import main

sys.exit(main())
