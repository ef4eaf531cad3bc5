"""`python -m muse`: see muse/cli.py."""

import sys

from .cli import main

sys.exit(main())
