"""Which model each service runs: the trained checkpoint named by settings, or the
baseline, said at start.

``make train`` writes four checkpoints under ``Settings.models_dir``: ``item-encoder``
(fusion MLP), ``user-updater`` (residual network), ``ranker`` (two-tower) and
``rating-model`` (item factors of the rating predictor). The later ones were trained on,
or tuned with, the item encoder's vectors and record its version
(``item_encoder_version``); a service refuses such a checkpoint when the deployed item
encoder is another one (its vectors would be meaningless to them) and falls back to the
baseline instead, with a warning that says why.

Only the item encoder runs in torch; its modules are imported when it is built, so the
user-profile and recommender services, whose models run in numpy, never load torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import Settings
from shared.models.checkpoint import read_config
from shared.models.rating import RatingModel, load_rating_model
from shared.models.recommend import CandidateSources, Reranker
from shared.models.updater import RatingWeightedMean, UserUpdater

if TYPE_CHECKING:
    from shared.models.item_encoder import ItemEncoder

log = logging.getLogger(__name__)

ITEM_ENCODER = "item-encoder"
USER_UPDATER = "user-updater"
RANKER = "ranker"
RATING_MODEL = "rating-model"

FUSION_KIND = "fusion-item-encoder"
RESIDUAL_KIND = "residual-updater"
RANKER_KIND = "two-tower-ranker"
RATING_KIND = "rating-model"


def item_encoder_config(settings: Settings) -> dict[str, Any] | None:
    """The deployed trained item encoder's config, or None when there is none."""
    path = settings.checkpoint(ITEM_ENCODER)
    return None if path is None else read_config(path, FUSION_KIND)


def build_deployed_item_encoder(settings: Settings) -> ItemEncoder:
    """The trained fusion encoder when ``models_dir/item-encoder`` holds one; else the
    baseline ``ConcatItemEncoder``. Logs which one and why.

    Raises:
        ConfigurationError: a model file is missing, or the checkpoint does not fit the
            configured text/image encoders.
    """
    from shared.models.fusion import load_fusion_encoder
    from shared.models.image import load_image_encoder
    from shared.models.item_encoder import build_item_encoder, build_text_encoder

    path = settings.checkpoint(ITEM_ENCODER)
    if path is None:
        log.info("item encoder: baseline concat encoder (%s)", _why(settings, ITEM_ENCODER))
        return build_item_encoder(settings)

    encoder = load_fusion_encoder(path, build_text_encoder(settings), load_image_encoder(settings))
    log.info("item encoder: trained %s from %s", encoder.model_version, path)
    return encoder


def _compatible(settings: Settings, path: Path, kind: str) -> dict[str, Any] | None:
    """The checkpoint's config when it was trained on the deployed item encoder."""
    config = read_config(path, kind)
    encoder = item_encoder_config(settings)
    wanted = config.get("item_encoder_version")
    if encoder is None or encoder.get("version") != wanted:
        have = "the baseline item encoder" if encoder is None else encoder.get("version")
        log.warning(
            "checkpoint %s was trained on item encoder %s, but %s is deployed; not using it",
            path,
            wanted,
            have,
        )
        return None
    return config


def build_user_updater(settings: Settings) -> UserUpdater:
    """The trained residual updater when its checkpoint fits the deployed item encoder;
    else the rating-weighted mean. Logs which one and why.

    Raises:
        ConfigurationError: the checkpoint exists but cannot be read or does not fit.
    """
    path = settings.checkpoint(USER_UPDATER)
    if path is not None and _compatible(settings, path, RESIDUAL_KIND) is not None:
        from shared.models.residual import load_residual_updater

        updater = load_residual_updater(path, expected_dim=_encoder_dim(settings))
        log.info("user updater: trained %s from %s", updater.model_version, path)
        return updater
    baseline = RatingWeightedMean()
    log.info("user updater: baseline %s (%s)", baseline.model_version, _why(settings, USER_UPDATER))
    return baseline


def build_reranker(settings: Settings) -> Reranker | None:
    """The trained two-tower ranker with fresh online item features when its checkpoint
    fits the deployed item encoder; else None (candidates are ranked by cosine). With it
    the rating model when its checkpoint fits too (else the ranker's rating head
    predicts ratings). Logs which and why.

    Raises:
        ConfigurationError: the checkpoint exists but cannot be read or does not fit.
    """
    path = settings.checkpoint(RANKER)
    if path is not None and _compatible(settings, path, RANKER_KIND) is not None:
        from shared.models.ranker import load_ranker

        ranker = load_ranker(path, expected_dim=_encoder_dim(settings))
        log.info("ranker: trained %s from %s", ranker.model_version, path)
        return Reranker(
            ranker,
            CandidateSources(
                ranker.new_item_stats(),
                **{**ranker.candidate_pools, "n_co": settings.n_co_candidates},
            ),
            build_rating_model(settings),
        )
    log.info("ranker: none, candidates ranked by cosine (%s)", _why(settings, RANKER))
    return None


def build_rating_model(settings: Settings) -> RatingModel | None:
    """The trained rating predictor when its checkpoint fits the deployed item encoder;
    else None. Logs which and why.

    Raises:
        ConfigurationError: the checkpoint exists but cannot be read.
    """
    path = settings.checkpoint(RATING_MODEL)
    if path is not None and _compatible(settings, path, RATING_KIND) is not None:
        model = load_rating_model(path)
        log.info("rating model: trained %s from %s", model.model_version, path)
        return model
    log.info(
        "rating model: none, the ranker's rating head predicts (%s)",
        _why(settings, RATING_MODEL),
    )
    return None


def _encoder_dim(settings: Settings) -> int | None:
    """The deployed item encoder's output dimension, None for the baseline encoder."""
    encoder = item_encoder_config(settings)
    return None if encoder is None else int(encoder["out_dim"])


def _why(settings: Settings, name: str) -> str:
    if not settings.trained_models:
        return "trained models off: REELSTREAM_TRAINED_MODELS=false"
    return f"no usable checkpoint at {settings.models_dir / name}; `make train` writes one"
