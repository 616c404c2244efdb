"""What an indexing run reports: counts, failures, scan warnings, timings (``RunSummary``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from catalog.paths import encode_path, safe_text
from indexer.diff import Failure
from indexer.scan import ScanProblem


@dataclass
class FailedFile:
    """A file that failed; ``path`` and ``message`` in the text form of ``catalog.paths``."""

    path: str
    reason: str
    message: str
    known: bool = False  # failed the same way in an earlier run and unchanged since: not retried

    @classmethod
    def of(cls, failure: Failure) -> FailedFile:
        return cls(encode_path(failure.file.path), failure.reason, safe_text(failure.message), failure.known)


@dataclass
class ScanWarning:
    """What the scan could not look into (a dangling symlink, a folder it cannot read); not stored."""

    path: str
    reason: str
    message: str

    @classmethod
    def of(cls, problem: ScanProblem) -> ScanWarning:
        return cls(encode_path(problem.root / problem.rel), problem.reason, safe_text(problem.message))


@dataclass
class RunSummary:
    roots: list[str]
    dry_run: bool = False
    interrupted: bool = False
    generation: int | None = None
    published: bool = False  # this run published ``generation`` (False: nothing changed, or a dry run)
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    deleted: int = 0
    failed: int = 0
    embedded: int = 0  # images run through the model for their embedding
    captioned: int = 0
    model_inputs_backfilled: int = 0  # inputs stored for images indexed before (decode only)
    to_embed: int = 0  # what the plan asked for (dry run: what would be embedded)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[FailedFile] = field(default_factory=list)
    warnings: list[ScanWarning] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how the folders asked for map onto library roots

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["failures"] = [f.__dict__ for f in self.failures]
        out["warnings"] = [w.__dict__ for w in self.warnings]
        out["notes"] = list(self.notes)
        out["images_per_second"] = round(self.images_per_second, 2)
        out["seconds"] = round(self.seconds, 3)
        return out
