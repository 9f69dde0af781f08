"""``python -m services.user_profile worker``: run the user-profile worker.

Stops cleanly on SIGTERM or SIGINT: the batch in hand is finished and committed, the
ready file removed.
"""

from __future__ import annotations

import argparse
import logging

from services.user_profile.app import UserProfileWorker
from services.user_profile.naming import SERVICE
from shared.config import Settings
from shared.lifecycle import stop_on_signals
from shared.logs import configure_logging

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.user_profile",
        description="Ratings in, user profiles out.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("worker", help="consume ratings and publish user profiles")
    parser.parse_args(argv)

    configure_logging(SERVICE)
    worker = UserProfileWorker(Settings())
    stop_on_signals(worker.stop, SERVICE)
    worker.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
