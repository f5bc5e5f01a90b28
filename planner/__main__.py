"""``python -m planner``: same as ``pve-planner``."""

import sys

from planner.cli import main

sys.exit(main())
