"""The one settings object of the project.

Every value comes from (in order of precedence) CLI flags, environment variables prefixed ``BLIP2_``
(``DATABASE_URL`` also works unprefixed), a ``.env`` file, then the defaults below.

A leaf: imports nothing of the project. Enumerated values are ``Literal`` types, comma lists are parsed
and checked here, and every derived path has one ``resolved_*`` property, so no other module re-derives
a default. Packages below take plain values: ``encoder_options()`` and ``vector_index_options()`` hand
them over.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, TypedDict, cast

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# The catalog speaks SQLite and Postgres; Postgres through psycopg 3, the driver the project installs.
_POSTGRES_SCHEMES = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg"}


def normalise_database_url(url: str) -> str:
    """A usable SQLAlchemy URL for the catalog, or ValueError with a one-line reason.

    ``postgres://`` (what Heroku, Docker images and most hosting panels print) and ``postgresql://``
    become ``postgresql+psycopg://``: SQLAlchemy would otherwise look for psycopg2, which is not
    installed.
    """
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in _POSTGRES_SCHEMES:
        text = f"{_POSTGRES_SCHEMES[scheme.lower()]}://{rest}"
    try:
        parsed = make_url(text)
    except ArgumentError:
        raise ValueError(
            f"{url!r} is not a database URL; use e.g. postgresql://user@host:5432/db or "
            "sqlite:////absolute/path/catalog.db"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ValueError(
            f"the catalog runs on SQLite or Postgres, not {parsed.get_backend_name()!r} ({parsed.drivername}://...)"
        )
    return text


Dtype = Literal["float32", "float16", "bfloat16"]
VectorIndexKind = Literal["auto", "flat", "ivf"]
VectorIndexDevice = Literal["auto", "cpu", "cuda"]
IvfCodec = Literal["sq8", "fp16"]

_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
# torch device names the encoder runs on; a device this machine lacks is refused when the model loads.
_DEVICE_PATTERN = r"^(cpu|mps|cuda(:[0-9]+)?)$"


def _comma_list(value: object) -> object:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; a list or tuple (``with_overrides``, tests) passes through."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class EncoderOptions(TypedDict):
    """The keyword arguments of ``blip2_embed.encoder.Blip2Encoder.from_pretrained`` these settings give."""

    retrieval: str | None
    caption: str | None
    device: str | None
    dtype: str | None
    batch_size: int


class VectorIndexOptions(TypedDict):
    """The fields of ``catalog.index_store.VectorIndexOptions`` these settings give."""

    kind: VectorIndexKind
    ivf_threshold: int
    ivf_threshold_cuda: int
    ivf_codec: IvfCodec
    nlist: int | None
    nprobe: int
    device: VectorIndexDevice


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BLIP2_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- storage -------------------------------------------------------------------------------
    data_dir: Path = Field(Path("./data"), description="Catalog, vector index and thumbnails live here.")
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("BLIP2_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL; default is a SQLite file in data_dir.",
    )

    # --- models --------------------------------------------------------------------------------
    retrieval_model: str = Field(
        "Salesforce/blip2-itm-vit-g",
        description="Hub id or folder of a Blip2ForImageTextRetrieval checkpoint.",
    )
    caption_model: str | None = Field(
        "Salesforce/blip2-opt-2.7b",
        description="Hub id or folder of a Blip2ForConditionalGeneration checkpoint; empty: no captions.",
    )
    device: str | None = Field(
        None, pattern=_DEVICE_PATTERN, description="torch device; default cuda when available, else cpu."
    )
    dtype: Dtype | None = Field(
        None, description="float32, float16 or bfloat16; default fp16 on CUDA, fp32 on CPU."
    )
    batch_size: int = Field(32, ge=1, description="Images per model batch.")
    max_image_pixels: int = Field(
        178_956_970, ge=1, description="Images with more pixels are refused as decompression bombs."
    )
    fast_jpeg: bool = Field(
        True, description="Decode JPEGs with DCT scaling (draft) before the exact resize."
    )

    # --- indexer -------------------------------------------------------------------------------
    index_workers: int | None = Field(
        None, ge=0, description="Decode worker processes; default CPU cores - 1; 0 decodes in-process."
    )
    index_hash_threads: int = Field(4, ge=1, description="Threads hashing new or changed files.")
    index_include_hidden: bool = Field(False, description="Also index hidden and system folders.")
    thumbnail_dir: Path | None = Field(None, description="Thumbnail folder; default data_dir/thumbnails.")
    thumbnail_size: int = Field(256, ge=0, description="Longer side of thumbnails, px; 0: no thumbnails.")
    store_model_inputs: bool = Field(
        True,
        description=(
            "Keep each image's exact model input (data_dir/model_inputs, ~75 KB at 224 px) for re-ranking "
            "and captions; false saves the disk, and they use the thumbnail (approximate)."
        ),
    )

    # --- end indexer ---------------------------------------------------------------------------

    # --- search_api ----------------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address `blip2-search serve` binds.")
    api_port: int = Field(8000, ge=0, le=65535, description="Port `blip2-search serve` binds.")
    api_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated API keys; empty: no auth. Keys always guard admin endpoints."
    )
    api_key_header: str = Field("X-API-Key", description="Header that carries the API key.")
    api_auth_all: bool = Field(False, description="Require an API key on every endpoint but health/ready.")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Comma-separated allowed CORS origins ('*' for any)."
    )
    max_query_chars: int = Field(1000, ge=1, description="Longest query/prompt text accepted.")
    max_k: int = Field(100, ge=1, description="Most hits one search page returns.")
    max_rerank_depth: int = Field(128, ge=0, description="Most ITC candidates the ITM re-ranks.")
    max_caption_hits: int = Field(16, ge=0, description="Most hits captioned per search.")
    max_rerank_candidates: int = Field(64, ge=1, description="Most candidates one /rerank call takes.")
    max_upload_bytes: int = Field(20_000_000, ge=1, description="Largest image upload, bytes.")
    max_upload_pixels: int = Field(50_000_000, ge=1, description="Most pixels an uploaded image may have.")
    caption_max_new_tokens: int = Field(30, ge=1, le=256, description="Default caption length, tokens.")
    index_poll_seconds: float = Field(2.0, gt=0, description="How often the API checks for a new index.")
    inference_max_batch: int = Field(64, ge=1, description="Most items one batched model call takes.")
    # The web page's defaults (served by GET /api/config; the page hard-codes none of them).
    page_size: int = Field(24, ge=1, description="Hits the page loads per scroll step (at most max_k).")
    page_weak_match_prob: float = Field(
        0.5, ge=0, le=1, description="Re-ranked hits with a lower ITM P(match) are 'weaker matches'."
    )
    page_weak_similarity: float = Field(
        0.5, ge=-1, le=1, description="Image searches: hits with a lower similarity are 'weaker matches'."
    )
    duplicate_similarity: float = Field(
        0.95, ge=-1, le=1, description="Image-image similarity at or above which hits are near-duplicates."
    )
    date_sort_pool: int = Field(
        200, ge=1, description="sort=date orders this many best hits of the relevance ranking by date."
    )
    display_max_side: int = Field(1600, ge=64, description="Longer side of the viewer's display image, px.")
    # --- end search_api ------------------------------------------------------------------------

    # --- catalog -------------------------------------------------------------------------------
    vector_index_dir: Path | None = Field(None, description="Vector index files; default data_dir/index.")
    vector_index_kind: VectorIndexKind = Field(
        "auto",
        description="flat: exact; ivf: approximate (IVF, scalar-quantised); auto: flat below the threshold.",
    )
    vector_index_ivf_threshold: int = Field(
        250_000, ge=0, description="auto: images above which a CPU index becomes IVF."
    )
    vector_index_ivf_threshold_cuda: int = Field(
        2_000_000, ge=0, description="auto: images above which a GPU-searched index becomes IVF."
    )
    vector_index_ivf_codec: IvfCodec = Field(
        "sq8", description="IVF vector storage: sq8 (1 byte/dim) or fp16."
    )
    vector_index_nlist: int | None = Field(None, ge=1, description="IVF lists; default ~sqrt(vectors).")
    vector_index_nprobe: int = Field(32, ge=1, description="IVF lists searched per query vector.")
    vector_index_device: VectorIndexDevice = Field(
        "auto", description="Where the index is searched; auto: cuda if present."
    )
    # --- end catalog ---------------------------------------------------------------------------

    # --- validation ----------------------------------------------------------------------------
    @field_validator("database_url")
    @classmethod
    def _valid_database_url(cls, value: str | None) -> str | None:
        return normalise_database_url(value) if value and value.strip() else None

    @field_validator("device", "dtype", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        # BLIP2_DEVICE= (empty) in a compose file or .env means "choose for me", like leaving it unset.
        if isinstance(value, str):
            value = value.strip().lower()
            return _DTYPE_ALIASES.get(value, value) or None
        return value

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        return _comma_list(value)

    @field_validator("api_keys")
    @classmethod
    def _valid_keys(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        if any(any(c.isspace() or not c.isprintable() for c in key) for key in keys):
            raise ValueError("an API key may not contain spaces or control characters")
        return keys

    @field_validator("cors_origins")
    @classmethod
    def _valid_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"{origin!r} is not an origin: use e.g. https://photos.example.org or '*'")
        return tuple(o.rstrip("/") for o in origins)

    # --- derived paths: the one place each default is decided -----------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"

    @property
    def resolved_thumbnail_dir(self) -> Path:
        return self.thumbnail_dir or self.data_dir / "thumbnails"

    @property
    def resolved_model_input_dir(self) -> Path | None:
        """Where model inputs are kept (catalog.model_inputs), or None when they are not."""
        return self.data_dir / "model_inputs" if self.store_model_inputs else None

    @property
    def resolved_vector_index_dir(self) -> Path:
        return self.vector_index_dir or self.data_dir / "index"

    @property
    def resolved_indexer_lock(self) -> Path:
        """The file the one indexer of this data folder holds locked while it runs."""
        return self.data_dir / "indexer.lock"

    # --- what the packages below take ------------------------------------------------------------

    def with_overrides(self, **flags: object) -> Settings:
        """These settings with command-line flags on top; a flag left as None keeps the env/default.

        Validated like the environment's values (a ``--database-url postgres://...`` is normalised too).
        """
        changes = {k: v for k, v in flags.items() if v is not None}
        return type(self).model_validate(self.model_dump() | changes) if changes else self

    def encoder_options(self, *, retrieval: bool = True, caption: bool = True) -> EncoderOptions:
        """What loads the encoder: ``Blip2Encoder.from_pretrained(**settings.encoder_options())``;
        ``retrieval=False`` / ``caption=False`` skip a model."""
        return EncoderOptions(
            retrieval=self.retrieval_model if retrieval else None,
            caption=(self.caption_model or None) if caption else None,
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
        )

    def vector_index_options(self) -> VectorIndexOptions:
        """How the vector index is built and searched: the fields of ``catalog.index_store``'s
        ``VectorIndexOptions``, as in ``VectorIndexOptions(**settings.vector_index_options())``: each
        is the ``vector_index_<field>`` setting."""
        return cast(
            VectorIndexOptions,
            {key: getattr(self, f"vector_index_{key}") for key in VectorIndexOptions.__annotations__},
        )

    def as_env(self) -> dict[str, str]:
        """Environment variables that reproduce these settings in a child process (unset: None)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            env[f"BLIP2_{name.upper()}"] = ",".join(value) if isinstance(value, tuple) else str(value)
        return env


@lru_cache
def get_settings() -> Settings:
    return Settings()
