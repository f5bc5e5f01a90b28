"""``python -m executor``: same as ``pve-executor``."""

import sys

from executor.cli import main

sys.exit(main())
