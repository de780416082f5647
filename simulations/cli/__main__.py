"""`python -m simulations.cli`: the same as the `fedscore` command."""

import sys

from simulations.cli.main import entry

sys.exit(entry())
