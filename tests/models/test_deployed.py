"""Which models the services run: the committed checkpoints in ``models/`` (written by
``make train``), or the baselines when a checkpoint is missing, switched off or was
trained for another item encoder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from shared.config import Settings
from shared.domain import Movie
from shared.models.deployed import (
    ITEM_ENCODER,
    RANKER,
    RATING_MODEL,
    USER_UPDATER,
    build_deployed_item_encoder,
    build_reranker,
    build_user_updater,
)
from shared.models.item_encoder import ConcatItemEncoder
from shared.models.residual import ResidualUpdater
from shared.models.updater import RatingWeightedMean

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"


@pytest.fixture(scope="module")
def models_dir() -> Path:
    names = (ITEM_ENCODER, USER_UPDATER, RANKER, RATING_MODEL)
    missing = [n for n in names if not (MODELS / n).is_dir()]
    assert not missing, f"checkpoints {missing} missing from {MODELS}: run `make train`"
    return MODELS


def test_the_committed_checkpoints_are_deployed_together(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, clip_weights=None, device="cpu")
    encoder = build_deployed_item_encoder(settings)
    updater = build_user_updater(settings)
    reranker = build_reranker(settings)
    assert encoder.model_version.startswith("fusion-")
    assert isinstance(updater, ResidualUpdater)
    assert reranker is not None and reranker.ranker.model_version.startswith("two-tower-")
    assert reranker.rating_model is not None
    assert reranker.rating_model.model_version.startswith("fold-in-")

    movie = Movie(movie_id="1", title="Toy Story", year=1995, genres=("Animation",))
    unseen = Movie(movie_id="new-9001", title="A film nobody rated", year=2026)
    [item, new] = encoder.encode([movie, unseen])
    assert item.vector.shape == (encoder.dim,)
    # The encoder was trained on TRAIN's ratings, Toy Story's among them.
    assert item.rated_in_training and not new.rated_in_training
    state = updater.learn_one(updater.initial_state(), item.vector, 5.0, datetime.now(UTC))
    vector = updater.vector(state)
    assert vector is not None and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert reranker.ranker.dim == encoder.dim


def test_trained_models_can_be_switched_off(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, trained_models=False, device="cpu")
    assert isinstance(build_deployed_item_encoder(settings), ConcatItemEncoder)
    assert isinstance(build_user_updater(settings), RatingWeightedMean)
    assert build_reranker(settings) is None


def test_a_checkpoint_trained_for_another_item_encoder_is_not_used(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (ITEM_ENCODER, USER_UPDATER, RANKER):
        shutil.copytree(models_dir / name, tmp_path / name)
    for name in (USER_UPDATER, RANKER):
        config_file = tmp_path / name / "config.json"
        config = json.loads(config_file.read_text())
        config["item_encoder_version"] = "fusion-v1-00000000"
        config_file.write_text(json.dumps(config))
    settings = Settings(models_dir=tmp_path, device="cpu")

    with caplog.at_level("WARNING"):
        assert isinstance(build_user_updater(settings), RatingWeightedMean)
        assert build_reranker(settings) is None
    assert "fusion-v1-00000000" in caplog.text


def test_a_rating_model_for_another_item_encoder_leaves_the_ranker_its_rating_head(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in (ITEM_ENCODER, RANKER, RATING_MODEL):
        shutil.copytree(models_dir / name, tmp_path / name)
    config_file = tmp_path / RATING_MODEL / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "item_encoder_version": "fusion-v1-00000000"}))

    with caplog.at_level("WARNING"):
        reranker = build_reranker(Settings(models_dir=tmp_path, device="cpu"))
    assert reranker is not None and reranker.rating_model is None
    assert "fusion-v1-00000000" in caplog.text


def test_without_an_item_encoder_checkpoint_everything_falls_back(
    models_dir: Path, tmp_path: Path
) -> None:
    shutil.copytree(models_dir / USER_UPDATER, tmp_path / USER_UPDATER)
    settings = Settings(models_dir=tmp_path, device="cpu")
    assert isinstance(build_deployed_item_encoder(settings), ConcatItemEncoder)
    assert isinstance(build_user_updater(settings), RatingWeightedMean)
    assert build_reranker(settings) is None


def test_the_user_profile_and_recommender_workers_run_their_models_without_torch(
    models_dir: Path,
) -> None:
    """Their nets run in numpy (``shared.models.layers``); importing torch would cost each
    process some 470 MB of resident memory. Only item-embedding loads it."""
    code = """
import sys
import shared.workers.recommender, shared.workers.user_profile
from shared.config import Settings
from shared.models.deployed import build_reranker, build_user_updater
settings = Settings()
updater, reranker = build_user_updater(settings), build_reranker(settings)
assert reranker is not None and reranker.rating_model is not None
print(updater.model_version, reranker.ranker.model_version)
print([m for m in ("torch", "torchvision", "open_clip", "transformers") if m in sys.modules])
"""
    env = {**os.environ, "REELSTREAM_MODELS_DIR": str(models_dir), "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert run.returncode == 0, run.stderr
    versions, loaded = run.stdout.strip().splitlines()
    assert versions.startswith("residual-v1-") and "two-tower-v4-" in versions
    assert loaded == "[]"
