"""`python -m flaxlm ...` runs the `flaxlm` command."""

import sys

from flaxlm.cli import main

sys.exit(main())
