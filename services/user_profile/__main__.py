"""``python -m services.user_profile worker``: ratings in, user profiles and item
feedback out (``shared.workers.user_profile``)."""

import sys

from shared.workers import run_worker
from shared.workers.user_profile import SERVICE, UserProfileWorker

if __name__ == "__main__":
    sys.exit(run_worker(SERVICE, UserProfileWorker, __doc__.splitlines()[0]))
