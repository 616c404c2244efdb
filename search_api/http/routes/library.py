"""What the web page asks besides searches: the server's limits, the library's filter choices, and
near-duplicate groups among hits."""

import datetime as dt

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from blip2_search.settings import Settings
from catalog.paths import encode_path
from search_api.http.deps import Service
from search_api.http.routes.common import api_router, problems
from search_api.http.validation import JsonImageId, refuse_unknown_query
from search_api.service.browse import MAX_DUPLICATE_IDS

# The BLIP-2 paper's VQA prompt; the page wraps "Ask about this photo" questions in it.
ASK_PROMPT = "Question: {question} Answer:"


class PageConfig(BaseModel):
    """The server's limits and the page's defaults: the page hard-codes none of them."""

    max_k: int
    page_size: int = Field(description="Hits the page loads per step (min of page_size and max_k).")
    max_rerank_depth: int
    default_rerank: int
    max_caption_hits: int
    max_query_chars: int
    max_upload_bytes: int
    caption_model: bool = Field(description="Captions and questions are available.")
    caption_max_new_tokens: int
    ask_prompt: str = Field(description="Template of 'Ask about this photo' prompts.")
    requires_key: bool = Field(description="Read endpoints need an API key (api_auth_all).")
    key_header: str
    weak_match_prob: float = Field(description="Re-ranked hits with a lower itm_prob are weaker matches.")
    weak_similarity: float = Field(description="Image searches: hits with a lower score are weaker matches.")
    duplicate_similarity: float
    date_sort_pool: int
    max_duplicate_ids: int


class CameraCount(BaseModel):
    name: str
    images: int


class Library(BaseModel):
    indexed_images: int = Field(description="Live images in the catalog (the index may lag briefly).")
    roots: list[str]
    folders: list[str] = Field(description="Folders below the roots, up to two levels (path_prefix values).")
    cameras: list[CameraCount] = Field(description="EXIF cameras ('make model'; camera filter values).")
    captured_min: dt.datetime | None
    captured_max: dt.datetime | None
    index_command: str = Field(description="The command that indexes photos.")


class DuplicatesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image_ids: list[JsonImageId] = Field(max_length=MAX_DUPLICATE_IDS, description="Hits, best first.")
    threshold: float | None = Field(
        None, ge=-1, le=1, description="Similarity at or above which hits group (default: the server's)."
    )


class Duplicates(BaseModel):
    threshold: float
    groups: list[list[int]] = Field(
        description="Groups of two or more ids: the first is the best-ranked, the rest collapse into it."
    )


def build(settings: Settings) -> APIRouter:
    # The config is public (like the page itself): the page must learn whether it needs a key.
    public = APIRouter(tags=["page"], dependencies=[Depends(refuse_unknown_query)])
    router = api_router("/api", ["page"])

    @public.get("/api/config", response_model=PageConfig)
    async def page_config(service: Service) -> PageConfig:
        """Limits and defaults for clients such as the web page. Needs no key."""
        return PageConfig(
            max_k=settings.max_k,
            page_size=min(settings.page_size, settings.max_k),
            max_rerank_depth=settings.max_rerank_depth,
            default_rerank=min(32, settings.max_rerank_depth),
            max_caption_hits=settings.max_caption_hits,
            max_query_chars=settings.max_query_chars,
            max_upload_bytes=settings.max_upload_bytes,
            caption_model=service.has_captions,
            caption_max_new_tokens=settings.caption_max_new_tokens,
            ask_prompt=ASK_PROMPT,
            requires_key=bool(settings.api_auth_all and settings.api_keys),
            key_header=settings.api_key_header,
            weak_match_prob=settings.page_weak_match_prob,
            weak_similarity=settings.page_weak_similarity,
            duplicate_similarity=settings.duplicate_similarity,
            date_sort_pool=settings.date_sort_pool,
            max_duplicate_ids=MAX_DUPLICATE_IDS,
        )

    @router.get("/library", response_model=Library, responses=problems(401))
    async def library(service: Service) -> Library:
        """What the search filters can choose from, and how many images are indexed."""
        f = await service.library()
        return Library(
            indexed_images=f.images,
            roots=[encode_path(r) for r in f.roots],
            folders=f.folders,
            cameras=[CameraCount(name=n, images=c) for n, c in f.cameras],
            captured_min=f.captured_min,
            captured_max=f.captured_max,
            index_command="blip2-search index /path/to/photos",
        )

    @router.post("/duplicates", response_model=Duplicates, responses=problems(401, 422))
    async def duplicates(service: Service, body: DuplicatesRequest) -> Duplicates:
        """Near-duplicate groups among the given hits: symmetric Chamfer similarity of their 32 vectors
        at or above the threshold. Scores are not touched; the page collapses each group into one card."""
        found = await service.near_duplicates(body.image_ids, body.threshold)
        return Duplicates(threshold=found.threshold, groups=found.groups)

    merged = APIRouter()
    merged.include_router(public)
    merged.include_router(router)
    return merged
