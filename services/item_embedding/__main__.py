"""``python -m services.item_embedding worker``: every movie's vector, from its content
and its raters (``shared.workers.item_embedding``)."""

import os
import sys

# Every model is read from local files; make the Hugging Face libraries refuse to reach
# the network rather than stall or download at run time. Set before they are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from shared.workers import run_worker
from shared.workers.item_embedding import SERVICE, ItemEmbeddingWorker

if __name__ == "__main__":
    sys.exit(run_worker(SERVICE, ItemEmbeddingWorker, __doc__.splitlines()[0]))
