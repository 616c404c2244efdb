"""Stop an indexing run at a known point: a ``ProgressSink`` that, at stage ``STAGE`` for the ``N``-th
time, creates the file ``MARKER`` and sleeps ``SECONDS`` (so a test can signal or inspect the run there).

``python -m tests.support.pause STAGE:N:SECONDS:MARKER index ARGS...`` runs the real ``blip2-search``
command in this process with the sink passed as the command's context object.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from indexer.progress import ProgressSink, Stage


class PauseAt(ProgressSink):
    def __init__(self, stage: str, n: int, seconds: float, marker: Path) -> None:
        self.at = (stage, n)
        self.seconds = seconds
        self.marker = marker

    @classmethod
    def parse(cls, spec: str) -> PauseAt:
        stage, n, seconds, marker = spec.split(":", 3)
        return cls(stage, int(n), float(seconds), Path(marker))

    def stage(self, name: Stage, n: int) -> None:
        if (name, n) == self.at:
            self.marker.write_text(f"{name}:{n}\n")
            time.sleep(self.seconds)


def main() -> None:
    from blip2_search.cli import app

    spec, *args = sys.argv[1:]
    app(args, prog_name="blip2-search", obj=PauseAt.parse(spec))


if __name__ == "__main__":
    main()
