"""``python -m services.user_profile worker``: run the user-profile worker.

faust's worker runs the event loop and stops the app cleanly on SIGTERM or SIGINT
(in-flight batch finished, offsets committed, ready file removed).
"""

from __future__ import annotations

import argparse

import faust

from services.user_profile.app import UserProfileApp
from services.user_profile.naming import SERVICE
from shared.config import Settings
from shared.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.user_profile",
        description="Ratings in, user profiles out (faust-streaming worker).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("worker", help="consume ratings and publish user profiles")
    parser.parse_args(argv)

    configure_logging(SERVICE)
    service = UserProfileApp(Settings())
    worker = faust.Worker(
        service.app,
        # Our logging is already configured; faust must neither replace it nor
        # capture stdout.
        override_logging=False,
        redirect_stdouts=False,
        quiet=True,
    )
    # A terminal progress spinner has no place in a service's log.
    worker.spinner = None
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
