"""The ranking rule, as pure functions over candidates (no I/O, no model).

The first ``depth`` ITC hits that got an ITM score are re-scored ``score = itm_logit + itc_score``
(LAVIS's retrieval score, ``itm_logit`` the ITM head's "match" logit) and ordered by it, ties by id;
re-rank candidates without a score (unreadable input) follow in ITC order, then every hit past the
depth in ITC order with ``score = itc_score``. Pages are slices of that one ranking.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Candidate:
    image_id: int
    itc: float
    itm_prob: float | None = None
    itm_logit: float | None = None
    caption: str | None = None

    @property
    def reranked(self) -> bool:
        return self.itm_logit is not None

    @property
    def score(self) -> float:
        return self.itc + self.itm_logit if self.itm_logit is not None else self.itc


def final_order(cands: list[Candidate], depth: int) -> list[Candidate]:
    """The whole ranking, once the first ``depth`` candidates carry their ITM scores."""
    head = cands[:depth]
    scored = sorted((c for c in head if c.reranked), key=lambda c: (-c.score, c.image_id))
    return scored + [c for c in head if not c.reranked] + cands[depth:]


def next_offset(total: int, offset: int, k: int) -> int | None:
    return offset + k if total > offset + k else None
