"""The phases of one indexing run: scan, plan, record the plan, embed in batches, publish
(``indexer.run.run_index`` wraps them with the lock, the schema and the index catch-up).

Crash safety comes from the order of commits, not from cleanup code (a SIGKILL runs none):
1. the plan's cheap outcomes (deletions, moves, stat refreshes, files that fail before decoding) and
   the content hash of every file still to embed (status ``pending``) are committed first, so a resumed
   run neither loses them nor hashes again;
2. each batch commits its images' embeddings, captions and metadata *together with* its files' change
   to ``indexed``, so a file is never indexed without its vectors, and vectors committed once are seen
   by the next run's diff (no image is embedded twice);
3. the generation is published last; a killed run leaves it open and the next run continues it
   (``catalog.repository.open_generation``), so the search side sees all of a run's changes at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from blip2_embed.errors import ConfigurationError
from blip2_embed.images import normalise
from catalog import repository as repo
from catalog.model_inputs import ModelInputStore
from catalog.models import FileStatus
from catalog.paths import as_uri, encode_path, is_uri
from catalog.thumbnails import ThumbnailStore
from indexer import catalog_writes as writes
from indexer.decode import DecodeConfig, Decoded, DecodeFailure
from indexer.diff import CatalogFile, Failure, Plan, WorkItem, make_plan
from indexer.pipeline import DecodePool, ModelOutput, Timings, WriterThread, run_model
from indexer.progress import ProgressSink
from indexer.roots import RootScope, is_under, plan_roots
from indexer.scan import ScannedFile, ScanProblem, scan_root
from indexer.summary import FailedFile, RunSummary, ScanWarning

if TYPE_CHECKING:
    from blip2_embed.encoder import Blip2Encoder
    from blip2_search.settings import Settings

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def default_workers() -> int:
    """One core for the main thread (model feeding, writer); the rest decode."""
    return max(1, (os.cpu_count() or 2) - 1)


def _resolved_root(root: Path | str, *, ray: bool) -> Path:
    """A root the run can scan: a local folder made absolute, or an object-store prefix (a
    ``catalog.paths.ObjectURI``, typed as a Path for the plan: only pyarrow opens it). ``ray``: the
    run's decode can open URIs (the Ray engine; or a dry run, which decodes nothing)."""
    if is_uri(root):
        uri = as_uri(root)
        if not ray:
            raise ConfigurationError(f"{uri}: object-store roots are read by --engine ray only")
        from indexer.object_store import is_folder

        if not is_folder(uri):
            raise FileNotFoundError(f"not a folder: {uri} (no objects under it)")
        return cast(Path, uri)
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        # Never diff a missing root: an unmounted drive would look like every photo deleted.
        raise FileNotFoundError(f"not a folder: {encode_path(path)}")
    return path


@dataclass
class IndexOptions:
    roots: list[Path]
    batch_size: int = 32
    workers: int = field(default_factory=default_workers)
    caption: bool = False
    caption_prompt: str | None = None
    dry_run: bool = False
    include_hidden: bool = False
    thumbnail_dir: Path | None = None
    thumbnail_size: int = 256
    model_input_dir: Path | None = None  # None: model inputs are not stored (catalog.model_inputs)
    fast_jpeg: bool = True
    max_pixels: int = 178_956_970
    hash_threads: int = 4
    retry_failed: bool = False  # process known failures (unchanged files that failed before) again

    @classmethod
    def from_settings(cls, settings: Settings, roots: list[Path], **flags: Any) -> IndexOptions:
        """The options ``settings`` give, with a run's own ``flags`` (caption, dry_run, ...) on top."""
        options = cls(
            roots=list(roots),
            batch_size=settings.batch_size,
            workers=default_workers() if settings.index_workers is None else settings.index_workers,
            include_hidden=settings.index_include_hidden,
            thumbnail_dir=settings.resolved_thumbnail_dir,
            thumbnail_size=settings.thumbnail_size,
            model_input_dir=settings.resolved_model_input_dir,
            fast_jpeg=settings.fast_jpeg,
            max_pixels=settings.max_image_pixels,
            hash_threads=settings.index_hash_threads,
        )
        return dataclasses.replace(options, **flags)


class ModelEngine(Protocol):
    """Where the decode + model phase runs (default: this process's ``DecodePool`` and encoder;
    ``indexer.ray_engine.RayEngine`` on a Ray cluster). An engine yields one row per work item and
    ``Indexer.commit_stream`` commits them as the local loop does (same transactions, same stages)."""

    def embed(self, indexer: Indexer, work: list[WorkItem], summary: RunSummary) -> Iterator[EngineRow]: ...


@dataclass
class EngineRow:
    """One work item after an engine's decode and model pass (its ``model_input`` need not travel)."""

    item: WorkItem
    result: Decoded | DecodeFailure
    embedding: np.ndarray | None = None
    caption: str | None = None


@dataclass
class _Batch:
    """What the writer commits for one model batch."""

    number: int
    items: list[tuple[WorkItem, Decoded]]
    embeddings: list[np.ndarray | None]
    captions: list[str | None]
    failures: list[Failure]


class Indexer:
    """Runs the phases over one catalog with one encoder. ``stop`` (a threading.Event) is set by the
    SIGINT handler; the run then finishes the batch in hand, commits it and publishes."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        encoder: Blip2Encoder,
        options: IndexOptions,
        *,
        progress: ProgressSink | None = None,
        stop: threading.Event | None = None,
        engine: ModelEngine | None = None,
    ) -> None:
        self.sessions = sessions
        self.engine = engine
        self.encoder = encoder
        self.options = options
        self.progress = progress or ProgressSink()
        self.stop = stop or threading.Event()
        self.timings = Timings()
        if encoder.retrieval_key is None:
            raise ValueError("indexing needs a retrieval model (set BLIP2_RETRIEVAL_MODEL)")
        self.model_key: str = encoder.retrieval_key
        self.caption_key: str | None = encoder.caption_key if options.caption else None
        if options.caption and self.caption_key is None:
            raise ValueError("--caption needs a caption model (set BLIP2_CAPTION_MODEL)")
        self.thumbnails = (
            ThumbnailStore(options.thumbnail_dir, options.thumbnail_size)
            if options.thumbnail_dir is not None and options.thumbnail_size > 0
            else None
        )
        inputs_dir = options.model_input_dir
        self.model_inputs = ModelInputStore(inputs_dir, encoder.spec) if inputs_dir is not None else None

    # ------------------------------------------------------------------ phases
    def run(self) -> RunSummary:
        started = time.perf_counter()
        reads_uris = self.engine is not None or self.options.dry_run
        roots = [_resolved_root(r, ray=reads_uris) for r in self.options.roots]
        summary = RunSummary(roots=[encode_path(r) for r in roots], dry_run=self.options.dry_run)
        with self.sessions() as session:
            scopes = self._scopes(session, roots, summary)
            root_ids = {scope.root: scope.root_id for scope in scopes if scope.root_id is not None}
            plan = self._plan(session, scopes, summary)
            self._count(summary, plan)
            if self.options.dry_run:
                session.rollback()
                summary.seconds = time.perf_counter() - started
                return summary
            state = repo.generation_state(session)
            if plan.is_empty and state.open_generation <= state.published_generation:
                # A no-op run publishes nothing: the generation moves only when the catalog changed,
                # so servers polling it and index catch-ups have nothing to do.
                session.commit()  # roots seen for the first time
                summary.generation = int(state.published_generation)
                summary.seconds = time.perf_counter() - started
                return summary
            generation = repo.open_generation(session)
            summary.generation = generation
            self._record_plan(session, writes.RootIds(root_ids), plan, generation)
            session.commit()
        self.progress.stage("planned", 1)

        self._embed(plan, writes.RootIds(root_ids), generation, summary)

        with self.sessions() as session:
            self.progress.stage("before-publish", 1)
            repo.publish_generation(session, generation)
            session.commit()
        summary.published = True
        summary.seconds = time.perf_counter() - started
        summary.timings = self.timings.as_dict()
        return summary

    def _scopes(self, session: Session, roots: list[Path], summary: RunSummary) -> list[RootScope]:
        """The library roots this run scans, and which parts of them (``indexer.roots``)."""
        scopes, summary.notes = plan_roots(roots, repo.list_roots(session))
        for scope in scopes:
            if scope.root_id is None:  # a new root; a dry run creates nothing
                scope.root_id = -1 if self.options.dry_run else repo.get_or_create_root(session, scope.root)
        return scopes

    def _plan(self, session: Session, scopes: list[RootScope], summary: RunSummary) -> Plan:
        from blip2_embed.images import sniff_format
        from indexer.decode import sha256_file

        views: dict[Path, dict[str, CatalogFile]] = {}
        scanned: dict[Path, list[ScannedFile]] = {}
        for scope in scopes:
            if scope.root_id is None:
                raise AssertionError("_scopes gives every root an id")
            view = writes.catalog_view(session, scope.root_id)

            def known(rel: str, size: int, mtime_ns: int, view: dict[str, CatalogFile] = view) -> bool:
                old = view.get(rel)
                return (
                    old is not None
                    and old.status in ("indexed", "pending")
                    and (old.size, old.mtime_ns) == (size, mtime_ns)
                )

            problems: list[ScanProblem] = []
            scanned[scope.root] = list(
                scan_root(
                    scope.root,
                    include_hidden=self.options.include_hidden,
                    known=known,
                    sniff=sniff_format,
                    folders=scope.folders,
                    excluded=scope.excluded,
                    problems=problems,
                )
            )
            summary.warnings += [ScanWarning.of(p) for p in problems]
            # The rows this scan speaks for: those it could have seen. Rows outside the folders asked
            # for, in nested roots, or under a folder it could not read are neither checked nor deleted.
            unseen = [p.rel for p in problems if p.keeps_rows]
            views[scope.root] = {
                rel: row
                for rel, row in view.items()
                if scope.covers(rel) and not any(is_under(rel, u) for u in unseen)
            }
        caption_key = self.caption_key
        return make_plan(
            scanned,
            views,
            embedded=lambda hashes: writes.embedded_hashes(session, hashes, self.model_key),
            captioned=(
                (lambda hashes: writes.captioned_hashes(session, hashes, caption_key, self._prompt))
                if caption_key
                else None
            ),
            hasher=sha256_file,
            hash_threads=self.options.hash_threads,
            retry_failed=self.options.retry_failed,
        )

    @property
    def _prompt(self) -> str:
        return self.options.caption_prompt or ""

    @staticmethod
    def _count(summary: RunSummary, plan: Plan) -> None:
        summary.new, summary.changed, summary.unchanged = plan.new, plan.changed, plan.unchanged
        summary.moved, summary.deleted = plan.moved, plan.deleted_count
        summary.to_embed = plan.images_to_embed
        summary.failures += [FailedFile.of(fl) for fl in plan.failed + plan.known_failed]
        summary.failed = len(summary.failures)

    def _record_plan(self, session: Session, roots: writes.RootIds, plan: Plan, generation: int) -> None:
        """Everything decided without the model, in one transaction (see the module docstring)."""
        by_root: dict[Path, list[str]] = {}
        for root, rel in plan.deleted:
            by_root.setdefault(root, []).append(rel)
        for root, rels in by_root.items():
            repo.mark_deleted(session, roots[root], rels, generation)
        sizes = {w.sha256: w.files[0].size for w in plan.work}
        sizes.update({sha: f.size for f, sha in plan.link + plan.touch})
        ids = repo.get_or_create_images(session, sizes.items())
        updates = [(f, writes.update(f, ids[sha], FileStatus.INDEXED)) for f, sha in plan.link + plan.touch]
        for w in plan.work:
            # Content already embedded (caption-only work) stays findable while it waits for its caption.
            status = FileStatus.PENDING if w.embed else FileStatus.INDEXED
            updates += [(f, writes.update(f, ids[w.sha256], status)) for f in w.files]
        updates += writes.failure_updates(session, plan.failed)
        writes.write_file_updates(session, roots, updates, generation)

    # ------------------------------------------------------------------ model work
    def _embed(self, plan: Plan, roots: writes.RootIds, generation: int, summary: RunSummary) -> None:
        work = plan.work
        if not work:
            return
        if self.engine is not None:
            rows = self.engine.embed(self, work, summary)
            self.commit_stream(rows, len(work), roots, generation, summary)
            return
        opts = self.options
        config = self.decode_config()
        workers = min(opts.workers, len(work))
        writer: WriterThread[_Batch] = WriterThread(
            lambda batch: self._write(batch, roots, generation), self.timings
        )
        self.progress.start(len(work), summary)
        batch: list[tuple[WorkItem, Decoded]] = []
        failures: list[Failure] = []
        number = 0

        def flush() -> None:
            nonlocal batch, failures, number
            number += 1
            out = self._model(batch)
            self._hand_over(writer, _Batch(number, batch, out.embeddings, out.captions, failures), summary)
            batch, failures = [], []

        try:
            with DecodePool[WorkItem](config, workers) as pool:
                results = pool.imap(work, lambda w: str(w.path))
                for item, result in self._waited(results):
                    decoded = self._usable(item, result, failures, summary)
                    if decoded is None:
                        continue
                    batch.append((item, decoded))
                    if len(batch) >= opts.batch_size:
                        flush()
                        if self._stopped(summary):
                            break
                if (batch or failures) and not summary.interrupted:
                    flush()
        finally:
            writer.close()
            self.progress.stop()

    def _waited(self, results: Iterator[_T]) -> Iterator[_T]:
        """``results`` as they come, the time spent waiting for each counted as decode wait."""
        while True:
            t0 = time.perf_counter()
            nxt = next(results, None)
            self.timings.decode_wait += time.perf_counter() - t0
            if nxt is None:
                return
            yield nxt

    def _hand_over(self, writer: WriterThread[_Batch], batch: _Batch, summary: RunSummary) -> None:
        """A model batch is done: to the writer thread (which commits it), and counted."""
        self.progress.stage("embedded", batch.number)
        writer.put(batch)
        summary.embedded += sum(1 for e in batch.embeddings if e is not None)
        summary.captioned += sum(1 for c in batch.captions if c is not None)
        self.progress.advance(len(batch.items), summary)

    def _stopped(self, summary: RunSummary) -> bool:
        """After a committed batch: has a stop been asked for? (Then the run ends, marked interrupted.)"""
        if not self.stop.is_set():
            return False
        summary.interrupted = True
        log.warning("interrupted: stopping after the committed batches")
        return True

    def _usable(
        self, item: WorkItem, result: Decoded | DecodeFailure, failures: list[Failure], summary: RunSummary
    ) -> Decoded | None:
        """``result`` when it can be embedded; else it is counted (a failure of each of the item's files,
        or a file rewritten since it was hashed) and None comes back."""
        if isinstance(result, DecodeFailure):
            for f in item.files:
                failures.append(Failure(f, result.reason, result.message, result.sha256))
                summary.failures.append(FailedFile.of(failures[-1]))
            summary.failed = len(summary.failures)
            self.progress.advance(1, summary)
            return None
        if result.sha256 != item.sha256:
            # Rewritten between hashing and decoding: leave it pending; the next run sees the new
            # size/mtime and starts over for this file.
            log.warning("%s changed while being indexed; it will be indexed next run", item.path)
            self.progress.advance(1, summary)
            return None
        return result

    def commit_stream(
        self,
        rows: Iterator[EngineRow],
        total: int,
        roots: writes.RootIds,
        generation: int,
        summary: RunSummary,
    ) -> None:
        """Commit an engine's rows in batches of ``batch_size`` decoded images, as ``_embed`` does: the
        same transactions, the same stages, the same stop after a committed batch."""
        writer: WriterThread[_Batch] = WriterThread(
            lambda batch: self._write(batch, roots, generation), self.timings
        )
        self.progress.start(total, summary)
        batch: list[tuple[WorkItem, Decoded]] = []
        outs: list[tuple[np.ndarray | None, str | None]] = []
        failures: list[Failure] = []
        number = 0

        def flush() -> None:
            nonlocal batch, outs, failures, number
            number += 1
            embeddings = [e for e, _ in outs]
            captions = [c for _, c in outs]
            self._hand_over(writer, _Batch(number, batch, embeddings, captions, failures), summary)
            batch, outs, failures = [], [], []

        try:
            for row in self._waited(rows):
                item = row.item
                decoded = self._usable(item, row.result, failures, summary)
                if decoded is None:
                    continue
                batch.append((item, decoded))
                outs.append((row.embedding, row.caption))
                if len(batch) >= self.options.batch_size:
                    flush()
                    if self._stopped(summary):
                        break
            if (batch or failures) and not summary.interrupted:
                flush()
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # an engine's generator releases its cluster work
            writer.close()
            self.progress.stop()

    def decode_config(self) -> DecodeConfig:
        """How this run's workers decode; the backfill of model inputs decodes the same way."""
        return DecodeConfig(
            spec=self.encoder.spec,
            fast_jpeg=self.options.fast_jpeg,
            max_pixels=self.options.max_pixels,
            thumbnail_size=self.options.thumbnail_size if self.thumbnails is not None else 0,
            encode_model_input=self.model_inputs is not None,
        )

    def _model(self, batch: list[tuple[WorkItem, Decoded]]) -> ModelOutput:
        if not batch:
            return ModelOutput([], [])
        t0 = time.perf_counter()
        pixels = normalise(np.stack([d.model_input for _, d in batch]), self.encoder.spec)
        out = run_model(
            self.encoder,
            pixels,
            [w.embed for w, _ in batch],
            [w.caption for w, _ in batch],
            self.options.caption_prompt,
        )
        self.timings.model += time.perf_counter() - t0
        return out

    def write_files(self, sha256: str, decoded: Decoded) -> None:
        """The image's thumbnail and model input; before its catalog commit, so a committed image has
        both (see the module docstring)."""
        if self.thumbnails is not None and decoded.thumbnail is not None:
            self.thumbnails.put(sha256, decoded.thumbnail)
        if self.model_inputs is not None and decoded.model_input_file is not None:
            self.model_inputs.put(sha256, decoded.model_input_file)

    def _write(self, batch: _Batch, roots: writes.RootIds, generation: int) -> None:
        for item, decoded in batch.items:
            self.write_files(item.sha256, decoded)
        with self.sessions() as session:
            ids = repo.get_or_create_images(session, [(w.sha256, d.byte_size) for w, d in batch.items])
            vec_ids, vecs = [], []
            updates = []
            for (item, decoded), emb, cap in zip(batch.items, batch.embeddings, batch.captions, strict=True):
                image_id = ids[item.sha256]
                if item.embed:
                    writes.store_metadata(session, image_id, decoded.metadata)
                if emb is not None:
                    vec_ids.append(image_id)
                    vecs.append(emb)
                if cap is not None and self.caption_key is not None:
                    repo.store_caption(session, image_id, self.caption_key, cap, self._prompt)
                updates += [(f, writes.update(f, image_id, FileStatus.INDEXED)) for f in item.files]
            if vec_ids:
                writes.store_vectors(session, vec_ids, self.model_key, np.stack(vecs), generation)
            updates += writes.failure_updates(session, batch.failures)
            writes.write_file_updates(session, roots, updates, generation)
            self.progress.stage("before-commit", batch.number)
            session.commit()
        self.progress.stage("committed", batch.number)
