"""How a run reports while it works: a ``ProgressSink`` gets the counts and every stage it passes.

The CLI draws a Rich bar on a terminal and plain periodic lines elsewhere (``indexer.report``);
a program embedding the indexer passes its own sink. ``stage`` marks the points the crash-safety
argument of ``indexer.phases`` rests on, so a caller can observe (or a test stop) a run exactly there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from indexer.summary import RunSummary

# planned: the plan's commit is done, no model work yet; embedded: batch N's model pass is done;
# before-commit: inside batch N's open transaction (writer thread); committed: batch N is committed;
# before-publish: every batch committed, the generation not yet published.
Stage = Literal["planned", "embedded", "before-commit", "committed", "before-publish"]


class ProgressSink:
    """Does nothing; subclasses override what they need. Called from the run's threads (``stage``
    "before-commit" and "committed" from the writer thread), so an override must not block long."""

    def start(self, total: int, summary: RunSummary) -> None: ...

    def advance(self, n: int, summary: RunSummary) -> None: ...

    def stop(self) -> None: ...

    def stage(self, name: Stage, n: int) -> None:
        """The run reached stage ``name`` for the ``n``-th time (batch ``n``; 1 for whole-run stages)."""


class FanOut(ProgressSink):
    """Several sinks as one (the CLI's display plus a caller's observer)."""

    def __init__(self, sinks: Iterable[ProgressSink | None]) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def start(self, total: int, summary: RunSummary) -> None:
        for sink in self.sinks:
            sink.start(total, summary)

    def advance(self, n: int, summary: RunSummary) -> None:
        for sink in self.sinks:
            sink.advance(n, summary)

    def stop(self) -> None:
        for sink in self.sinks:
            sink.stop()

    def stage(self, name: Stage, n: int) -> None:
        for sink in self.sinks:
            sink.stage(name, n)
