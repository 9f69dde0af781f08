"""``python -m services.ingest <command>``; see ``services.ingest.cli``."""

import sys

from services.ingest.cli import main

sys.exit(main())
