"""CUDA-graph replay of fixed-shape model calls, and the attention masks that keep them capturable.

A small batch through the ViT (39 blocks) or the Q-Former (12 layers) launches hundreds of kernels
from Python; on a GPU that, not arithmetic, sets its time. :class:`GraphedFunction` records such a call
once per input shape in a CUDA graph and replays it, so the launches cost one. A captured call must not
look at tensor values on the host (``if mask.all()``, ``.item()``): transformers does that when it
builds a 4D mask from a 2D one, so callers hand the models a ready 4D mask (:func:`attention_mask_4d`),
or ``None`` when nothing is padded -- which is also what transformers itself passes to SDPA then.

On the CPU, or with graphs off, a :class:`GraphedFunction` just calls its function.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
# Attention implementations whose 4D mask format mask_for builds.
MASKED_ATTENTION = frozenset({"sdpa", "eager"})


def attention_mask_4d(
    mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """A 2D padding mask (B, T), 1 = attend, as the 4D mask (B, 1, 1, T) that transformers passes on.

    ``None`` when every position is attended (the mask is read on the host, so pass the tokenizer's
    CPU tensor: reading a device tensor would sync). SDPA takes bool (True = attend); eager attention
    adds a float mask (0 or the dtype's minimum), as transformers builds them.
    """
    if mask.device.type == "cpu" and bool(mask.bool().all()):
        return None
    return mask_for(mask.bool()[:, None, None, :], attn_implementation, dtype)


def mask_for(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A bool 4D mask (True = attend) in the form an attention implementation takes."""
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation != "eager":
        raise ValueError(f"no 4D mask format known for attention {attn_implementation!r}")
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: Outputs


def _clone(out: Outputs) -> Outputs:
    return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


class GraphedFunction:
    """``fn(*tensors)``, replayed from a CUDA graph captured at the first call with each input shape.

    The function must be a pure function of its tensor arguments (and of module weights), with no
    host syncs. Outputs are cloned out of the graph's memory, so they stay valid after the next call.
    ``max_graphs`` shapes are kept (least recently used first out); all of them share ``pool``. If a
    capture fails the function is logged once and called eagerly from then on.
    """

    def __init__(
        self,
        fn: Callable[..., Outputs],
        *,
        enabled: bool,
        name: str = "",
        max_graphs: int = 16,
        pool: Any = None,
    ) -> None:
        self.fn = fn
        self.enabled = enabled
        self.name = name or getattr(fn, "__name__", "call")
        self.max_graphs = max_graphs
        self.pool = pool if pool is not None or not enabled else torch.cuda.graph_pool_handle()
        self._graphs: OrderedDict[tuple[object, ...], _Graph] = OrderedDict()
        self.captures = 0

    def __call__(self, *args: torch.Tensor) -> Outputs:
        if not self.enabled:
            return self.fn(*args)
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        entry = self._graphs.pop(key, None)
        if entry is None:
            try:
                entry = self._capture(args)
            except RuntimeError as exc:
                log.warning("CUDA graph capture of %s failed (%s); running it eagerly", self.name, exc)
                self.enabled = False
                return self.fn(*args)
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        for buf, a in zip(entry.inputs, args, strict=True):
            buf.copy_(a)
        entry.graph.replay()
        return _clone(entry.outputs)

    def _capture(self, args: tuple[torch.Tensor, ...]) -> _Graph:
        inputs = tuple(a.clone() for a in args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuBLAS handles, SDPA kernel choice, allocator state
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the API searches the vector index on other threads while this one captures.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = self.fn(*inputs)
        self.captures += 1
        return _Graph(graph, inputs, outputs)

    def clear(self) -> None:
        self._graphs.clear()
