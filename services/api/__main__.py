"""``python -m services.api <command>``; see ``shared.read.cli``."""

import sys

from shared.read.cli import main

if __name__ == "__main__":
    sys.exit(main())
