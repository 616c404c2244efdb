"""Request and response bodies of the HTTP API (what the OpenAPI schema documents)."""

import datetime as dt
from dataclasses import dataclass
from functools import cache
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict

from search_api.validation import JsonImageId, NewTokens, text_type

# One /embed/text call takes at most this many texts.
MAX_TEXTS = 64


class Problem(BaseModel):
    """The one error shape (RFC 9457 problem details), served as ``application/problem+json``."""

    type: str = Field(examples=["urn:blip2-search:problem:not-found"])
    title: str
    status: int
    detail: str
    errors: list[dict] | None = None


class FileRef(BaseModel):
    root: str = Field(description="The library root folder.")
    relative_path: str = Field(description="POSIX path below the root.")
    path: str = Field(description="root + relative_path, for display.")


class ImageSummary(BaseModel):
    image_id: int
    path: str | None = Field(description="One file holding this content (first by root and path).")
    thumbnail_url: str
    original_url: str
    width: int | None = None
    height: int | None = None
    captured_at: dt.datetime | None = None


class ImageDetail(ImageSummary):
    sha256: str
    byte_size: int
    camera_make: str | None = None
    camera_model: str | None = None
    files: list[FileRef]
    caption: str | None = Field(None, description="The cached plain caption, if one was generated.")


class SearchHit(ImageSummary):
    rank: int = Field(description="1-based position in the full ranking (offset included).")
    itc_score: float = Field(description="ITC similarity: max over the image's 32 query vectors of q·v.")
    itm_prob: float | None = Field(None, description="P(match) of the ITM head; null when not re-ranked.")
    itm_logit: float | None = Field(
        None, description="The ITM head's 'match' logit (index 1 of its two logits); null when not re-ranked."
    )
    score: float = Field(
        description="The ranking score. Re-ranked hits: itm_logit + itc_score (LAVIS's retrieval score). "
        "Other hits: itc_score; they rank after every re-ranked hit."
    )
    reranked: bool
    caption: str | None = None


class SearchResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"description": "One page of a ranking."})

    query: str | None = None
    query_truncated: bool = Field(False, description="The query had more tokens than the text encoder takes.")
    k: int
    offset: int
    rerank_depth: int
    generation: int = Field(description="Index generation the search ran on.")
    indexed_images: int
    hits: list[SearchHit]
    next_offset: int | None = Field(description="Offset of the next page, null on the last one.")
    timings_ms: dict[str, float] = Field(
        description="Per-stage wall time: text_encode / image_encode, vector_search, load_candidates, "
        "rerank (ViT + ITM + captions share one batch), captions_cached, total."
    )


class RerankItem(BaseModel):
    rank: int
    image_id: int | None = Field(None, description="Catalog id, for catalog candidates.")
    upload_index: int | None = Field(None, description="Position among the uploaded files, for uploads.")
    itm_prob: float
    itm_logit: float = Field(description="The ITM 'match' logit.")
    itm_logits: list[float] = Field(description="Both ITM logits [no-match, match].")


class RerankResponse(BaseModel):
    text: str
    text_truncated: bool
    results: list[RerankItem] = Field(description="Sorted by itm_prob, highest first.")
    timings_ms: dict[str, float]


class CaptionResponse(BaseModel):
    image_id: int | None = None
    prompt: str | None = None
    text: str
    cached: bool = Field(description="True when the text came from the catalog's caption cache.")
    model_key: str
    timings_ms: dict[str, float]


class EmbedTextResponse(BaseModel):
    model_key: str
    dim: int
    truncated: list[bool]
    vectors: list[list[float]] = Field(description="(M, D) L2-normalised ITC text vectors.")


class EmbedImageResponse(BaseModel):
    model_key: str
    image_id: int | None = None
    dim: int
    num_vectors: int
    vectors: list[list[float]] = Field(description="(32, D) L2-normalised ITC query vectors.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    models_loaded: bool
    caption_model: bool
    index_generation: int | None
    published_generation: int | None
    indexed_images: int
    inference_queue: int
    detail: str | None = None


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    # A misspelt field (``max_tokens`` for ``max_new_tokens``) is refused, never silently defaulted.
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RequestModels:
    rerank: type[BaseModel]
    caption: type[BaseModel]
    embed_text: type[BaseModel]


@cache
def request_models(max_chars: int) -> RequestModels:
    """The JSON request bodies for texts of at most ``max_chars`` characters (``max_query_chars``)."""
    Text = text_type(max_chars)
    Prompt = text_type(max_chars, optional=True)

    class RerankRequest(_Body):
        text: Text = Field(description="The text every candidate is matched against.")
        image_ids: list[JsonImageId] = Field(description="Catalog image ids.")

    class CaptionRequest(_Body):
        image_id: JsonImageId
        prompt: Prompt | None = Field(
            None, description='Instruction, e.g. "Question: what is this? Answer:".'
        )
        max_new_tokens: Annotated[NewTokens, Strict()] | None = Field(
            None, description="Tokens to generate (default: the server's caption_max_new_tokens)."
        )

    class EmbedTextRequest(_Body):
        texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)

    return RequestModels(RerankRequest, CaptionRequest, EmbedTextRequest)
