"""`python -m nanolstm` runs the command line."""

import sys

from nanolstm.cli import main

sys.exit(main())
