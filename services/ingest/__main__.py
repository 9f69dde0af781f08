"""``python -m services.ingest <command>``; see ``shared.ingest.cli``."""

import sys

from shared.ingest.cli import main

if __name__ == "__main__":
    sys.exit(main())
