"""`python -m flaxlm ...` runs the `flaxlm` command."""

import sys

from flaxlm.cli import run

sys.exit(run())
