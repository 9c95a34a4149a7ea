"""``python -m palsctl``: the command line."""
import sys

from palsctl.cli import main

sys.exit(main())
