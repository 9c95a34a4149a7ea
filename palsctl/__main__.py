import sys

from palsctl.cli import main

sys.exit(main())
