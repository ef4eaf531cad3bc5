"""`python -m train ...`: see train.cli."""

import sys

from .cli import main

sys.exit(main())
