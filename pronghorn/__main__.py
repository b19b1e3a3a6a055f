"""``python -m pronghorn``: the same command line as ``pronghorn``."""

import sys

from .cli import main

sys.exit(main())
