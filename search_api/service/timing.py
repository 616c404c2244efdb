"""Per-stage wall times of one call (``timings_ms`` in every answer), also observed into metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Timer:
    def __init__(self, observe: Callable[[str, float], None] | None = None) -> None:
        self._observe = observe
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.stages[name] = round(self.stages.get(name, 0.0) + dt * 1000, 3)
            if self._observe is not None:
                self._observe(name, dt)

    def done(self) -> dict[str, float]:
        self.stages["total"] = round((time.perf_counter() - self.start) * 1000, 3)
        return self.stages
