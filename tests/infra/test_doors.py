"""infra.doors finds each kind of crossing of the layout's one-way doors, and none in a
tree that keeps to them."""

from __future__ import annotations

from pathlib import Path

from infra import doors


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def rules(root: Path) -> dict[str, str]:
    return {f"{c.path}:{c.line}": c.rule for c in doors.check(root)}


def test_each_door_is_checked(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "shared/events/record.py": "from shared.types import Vector\n",
            "shared/models/ranker.py": (
                "from shared.events import RatingSubmitted\n"
                "import confluent_kafka\n"
                "import torch\n"
                "opt = torch.optim.Adam([])\n"
            ),
            "shared/retrieval/recommend.py": "from ..models.ranker import Ranker\n",
            "shared/evaluation/metrics.py": "x = 1\n",
            "infra/bench.py": "from services.ingest import replay\n",
            "services/recommender/handler.py": "x = 1\n",
            "services/recommender/__main__.py": "x = 1\n" * (doors.SERVICE_LINES + 1),
        },
    )
    assert rules(root) == {
        "shared/events/record.py:1": "events depend on nothing",
        "shared/models/ranker.py:1": "models import no wire events",
        "shared/models/ranker.py:2": "models import no Kafka",
        "shared/models/ranker.py:4": "training and evaluation are the lab's",
        "shared/retrieval/recommend.py:1": "retrieval imports no model",
        "shared/evaluation/metrics.py:1": "training and evaluation are the lab's",
        "infra/bench.py:1": "shared and infra never import services",
        "services/recommender/handler.py:1": "a service is a short entry point",
        "services/recommender/__main__.py:1": "a service is a short entry point",
    }
    assert doors.main(["--root", str(root), "--quiet"]) == 1


def test_a_tree_that_keeps_to_the_doors_has_no_crossing(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "shared/events/record.py": "import pydantic\nfrom shared.events.topic import T\n",
            "shared/models/ranker.py": "import torch\nfrom shared.types import Vector\n",
            "shared/retrieval/mmr.py": "from shared.types import Vector\n",
            "shared/handlers/ratings.py": "from shared.models.ranker import Ranker\n",
            "infra/lab/train.py": "import torch\nopt = torch.optim.Adam([])\n",
            "services/recommender/__main__.py": "from shared.handlers import ratings\n",
        },
    )
    assert doors.check(root) == []
    assert doors.main(["--root", str(root)]) == 0
