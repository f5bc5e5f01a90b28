"""``python -m opctl``: same as ``opctl``."""

import sys

from opctl.cli import run

sys.exit(run())
