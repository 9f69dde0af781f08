"""``python -m services.recommender worker``: user profiles in, recommendation lists out
(``shared.workers.recommender``)."""

import sys

from shared.workers import run_worker
from shared.workers.recommender import SERVICE, RecommenderWorker

if __name__ == "__main__":
    sys.exit(run_worker(SERVICE, RecommenderWorker, __doc__.splitlines()[0]))
