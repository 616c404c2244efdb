"""Request and response bodies of the HTTP API (what the OpenAPI schema documents), and the mapping
of the service's results onto them (``of``: the one place URLs are added)."""

import dataclasses
import datetime as dt
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Self

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

from blip2_search.settings import Settings
from search_api.http.validation import ImageId, JsonImageId, JsonNewTokens, NewTokens, int_type, text_type
from search_api.service import types as st
from search_api.service.embed import MAX_TEXTS
from search_api.service.search import MAX_OFFSET

# Filter values are paths: kept as given (no stripping), up to a path's length.
MAX_PATH_CHARS = 4096
__all__ = ["MAX_OFFSET", "MAX_TEXTS"]


def image_urls(image_id: int) -> dict[str, str]:
    return {
        "thumbnail_url": f"/api/images/{image_id}/thumbnail",
        "original_url": f"/api/images/{image_id}/original",
    }


def _fields(obj: Any) -> dict[str, Any]:
    """A service dataclass's fields, shallow (nested dataclasses stay objects for their own ``of``)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


class Problem(BaseModel):
    """The one error shape (RFC 9457 problem details), served as ``application/problem+json``."""

    type: str = Field(examples=["urn:blip2-search:problem:not-found"])
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


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

    @classmethod
    def of(cls, d: st.ImageDetail) -> "ImageDetail":
        files = [FileRef(**_fields(f)) for f in d.files]
        return cls.model_validate({**_fields(d), "files": files, **image_urls(d.image_id)})


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

    @classmethod
    def of(cls, hit: st.Hit) -> "SearchHit":
        return cls.model_validate({**_fields(hit), **image_urls(hit.image_id)})


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
        "rerank (ViT + ITM), captions (from the same ViT features), captions_cached, total."
    )

    @classmethod
    def of(cls, page: st.SearchPage) -> "SearchResponse":
        return cls(**{**_fields(page), "hits": [SearchHit.of(h) for h in page.hits]})


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

    @classmethod
    def of(cls, r: st.RerankResult) -> "RerankResponse":
        return cls(**{**_fields(r), "results": [RerankItem(**_fields(i)) for i in r.results]})


class CaptionResponse(BaseModel):
    image_id: int | None = None
    prompt: str | None = None
    text: str
    cached: bool = Field(description="True when the text came from the catalog's caption cache.")
    model_key: str
    timings_ms: dict[str, float]

    @classmethod
    def of(cls, c: st.CaptionResult) -> "CaptionResponse":
        return cls(**_fields(c))


class _Embeddings(BaseModel):
    """A body of ITC vectors: the service's numpy ``vectors`` as nested lists, its other fields as is."""

    @classmethod
    def of(cls, e: st.TextEmbeddings | st.ImageEmbedding) -> Self:
        return cls(**{**_fields(e), "vectors": e.vectors.tolist()})


class EmbedTextResponse(_Embeddings):
    model_key: str
    dim: int
    truncated: list[bool]
    vectors: list[list[float]] = Field(description="(M, D) L2-normalised ITC text vectors.")


class EmbedImageResponse(_Embeddings):
    model_key: str
    image_id: int | None = None
    dim: int
    num_vectors: int
    vectors: list[list[float]] = Field(description="(32, D) L2-normalised ITC query vectors.")


class Health(BaseModel):
    status: str


# The service's dataclass is the body as it is (FastAPI documents and serialises dataclasses).
Readiness = st.Readiness


# ------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    # A misspelt field (``max_tokens`` for ``max_new_tokens``) is refused, never silently defaulted.
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Limits:
    """The settings the request bodies depend on (hashable: each set of models is built once)."""

    max_chars: int
    max_k: int
    max_caption_hits: int

    @classmethod
    def of(cls, settings: Settings) -> "Limits":
        return cls(settings.max_query_chars, settings.max_k, settings.max_caption_hits)


@dataclass(frozen=True)
class RequestModels:
    """JSON bodies (``rerank``, ``caption``, ``embed_text``) and multipart forms (the ``*_upload``)."""

    rerank: type[BaseModel]
    caption: type[BaseModel]
    embed_text: type[BaseModel]
    search_upload: type[BaseModel]
    rerank_upload: type[BaseModel]
    caption_upload: type[BaseModel]
    embed_upload: type[BaseModel]


@cache
def request_models(limits: Limits) -> RequestModels:
    """Every request body, with texts of at most ``max_query_chars`` characters."""
    Text = text_type(limits.max_chars)
    Prompt = text_type(limits.max_chars, optional=True)
    PathText = text_type(MAX_PATH_CHARS, strip=False, optional=True)
    prompt_doc = 'Instruction, e.g. "Question: what is this? Answer:".'
    tokens_doc = "Tokens to generate (default: the server's caption_max_new_tokens)."
    match_doc = "The text every candidate is matched against."

    class RerankRequest(_Body):
        text: Text = Field(description=match_doc)
        image_ids: list[JsonImageId] = Field(description="Catalog image ids.")

    class CaptionRequest(_Body):
        image_id: JsonImageId
        prompt: Prompt | None = Field(None, description=prompt_doc)
        max_new_tokens: JsonNewTokens | None = Field(None, description=tokens_doc)

    class EmbedTextRequest(_Body):
        texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS)

    class SearchUploadForm(_Body):
        file: UploadFile = Field(description="The query image.")
        k: int_type(1, limits.max_k) = Field(20, description="Hits per page.")
        offset: int_type(0, MAX_OFFSET) = Field(0, description="Hits to skip (pagination).")
        captions: int_type(0, limits.max_caption_hits) = Field(0, description="Caption this many top hits.")
        # The same filters and order as GET /api/search.
        root: PathText | None = Field(None, description="Only files under this root.")
        path_prefix: PathText | None = Field(None, description="Only paths below the root starting so.")
        captured_after: dt.datetime | None = Field(None, description="Captured at or after.")
        captured_before: dt.datetime | None = Field(None, description="Captured at or before.")
        camera: Prompt | None = Field(None, description="EXIF camera: make, model, or 'make model'.")
        sort: Literal["relevance", "date"] = Field("relevance", description="relevance, or date.")

    class RerankUploadForm(_Body):
        text: Text = Field(description=match_doc)
        files: list[UploadFile] | None = Field(None, description="Candidate images.")
        image_ids: list[ImageId] | None = Field(None, description="Catalog candidates.")

    class CaptionUploadForm(_Body):
        file: UploadFile = Field(description="The image.")
        prompt: Prompt | None = Field(None, description=prompt_doc)
        max_new_tokens: NewTokens | None = Field(None, description=tokens_doc)

    class EmbedUploadForm(_Body):
        file: UploadFile = Field(description="The image.")

    return RequestModels(
        RerankRequest, CaptionRequest, EmbedTextRequest, SearchUploadForm, RerankUploadForm,
        CaptionUploadForm, EmbedUploadForm,
    )  # fmt: skip
