"""Greedy decoding of a causal LM over a static KV cache, each token step one CUDA-graph replay.

``language_model.generate`` runs ~20 small kernels per OPT layer per token from Python, so on a GPU a
caption is bound by kernel launches (~15 ms per token for OPT-2.7B, against ~1.1 ms to read its weights
once). Here the cache is a transformers ``StaticCache`` sized to prompt + ``max_new_tokens``, the model
gets a ready 4D attention mask and explicit positions (so its forward does no host-side work that
depends on data), and the whole per-token step -- forward, greedy pick, EOS bookkeeping, advancing the
position -- is captured once per (batch, prompt length, cache length) in a CUDA graph and replayed. On
the CPU the same steps run eagerly: the tests prove on the CPU that they give ``generate``'s tokens.

Only plain greedy decoding is done here, with ``generate``'s stopping rules (EOS ids, ``max_new_tokens``,
``min_new_tokens``/``min_length``, finished rows padded with ``pad_token_id``); :func:`greedy_plan`
returns ``None`` for anything else (beams, sampling, penalties, processors, ...), and the caller uses
``generate``. The model's own ``forward`` and the library's cache are used as they are; what is written
by hand is the loop, the masks and the graph capture.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, StaticCache

from blip2_embed.graphs import MASKED_ATTENTION, mask_for

log = logging.getLogger(__name__)

# GenerationConfig fields whose value this decoder honours (or that cannot change greedy tokens: the
# sampling knobs are ignored by ``generate`` too when do_sample is off). Every other field must keep
# its default, or the request goes to ``generate``.
_HONOURED = frozenset(
    {
        "max_new_tokens",
        "max_length",
        "min_new_tokens",
        "min_length",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",
        "decoder_start_token_id",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "compile_config",
        "disable_compile",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "min_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "output_attentions",
        "output_hidden_states",
        "transformers_version",
        "_from_model_config",
        "_commit_hash",
        "_original_object_hash",
    }
)
_DEFAULTS = GenerationConfig().to_dict()


@dataclass(frozen=True)
class GreedyPlan:
    """What ``generate`` would do for one greedy request, reduced to the numbers the loop needs."""

    max_new_tokens: int
    min_new_tokens: int  # EOS is suppressed for the first this many new tokens
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


def greedy_plan(
    generation_config: GenerationConfig, prompt_length: int, **kwargs: object
) -> GreedyPlan | None:
    """The plan for ``generate(**kwargs)`` with this config, or ``None`` when it is not plain greedy.

    ``kwargs`` that are not generation-config fields (``logits_processor``, ``stopping_criteria``,
    ``streamer``, ...) and any non-default field outside the honoured set send the request to
    ``generate``; so do a missing ``max_new_tokens`` and a missing pad token.
    """
    config = copy.deepcopy(generation_config)
    unused = config.update(**kwargs)
    if unused:
        return None
    values = config.to_dict()
    for name, value in values.items():
        if name not in _HONOURED and name in _DEFAULTS and value != _DEFAULTS[name]:
            return None
    extra = set(values) - set(_DEFAULTS) - _HONOURED
    if any(values[name] not in (None, False, {}, []) for name in extra):
        return None
    if config.max_new_tokens is None or config.max_new_tokens < 1 or config.pad_token_id is None:
        return None
    eos = config.eos_token_id
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
    min_new = max(int(config.min_new_tokens or 0), int(config.min_length or 0) - prompt_length, 0)
    return GreedyPlan(
        max_new_tokens=int(config.max_new_tokens),
        min_new_tokens=min_new if eos_ids else 0,
        eos_token_ids=eos_ids,
        pad_token_id=int(config.pad_token_id),
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Runner:
    """Static buffers, cache and (on CUDA) the two graphs for one (batch, prompt, cache length) shape.

    Device state between steps: ``token`` (B, 1) the last picked token, ``position`` (B, 1) where it goes,
    ``step`` () how many tokens were picked, ``unfinished`` (B,), ``out`` (B, L - P) the picked tokens
    (pad after a row's EOS), ``mask`` the 4D attention mask of the step. The prefill's mask is causal
    over the prompt and closed over the rest of the cache.
    """

    def __init__(self, decoder: GreedyDecoder, batch: int, prompt: int, cache_len: int) -> None:
        lm = decoder.model
        self.decoder = decoder
        self.batch, self.prompt, self.cache_len = batch, prompt, cache_len
        dev = decoder.device
        embeddings: Any = lm.get_input_embeddings()
        hidden = int(embeddings.embedding_dim)
        self.embeds = torch.zeros(batch, prompt, hidden, dtype=decoder.dtype, device=dev)
        self.cache = StaticCache(config=lm.config, max_cache_len=cache_len)
        keys = torch.arange(cache_len, device=dev)
        causal = keys[None, :] <= torch.arange(prompt, device=dev)[:, None]  # (P, L)
        self.prefill_mask = decoder.mask_from_bool(causal[None, None].expand(batch, 1, -1, -1).contiguous())
        self.prefill_positions = torch.arange(prompt, device=dev)[None].expand(batch, -1).contiguous()
        self.open_keys = torch.zeros(batch, 1, 1, cache_len, dtype=torch.bool, device=dev)
        self.step_mask = decoder.mask_from_bool(self.open_keys)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.step = torch.zeros((), dtype=torch.long, device=dev)
        self.min_steps = torch.zeros((), dtype=torch.long, device=dev)
        self.pad = torch.zeros((), dtype=torch.long, device=dev)
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=dev)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=dev)
        self.eos = torch.zeros(0, dtype=torch.long, device=dev)
        self.eos_vocab = torch.zeros(0, dtype=torch.bool, device=dev)
        self.out = torch.zeros(batch, cache_len - prompt, dtype=torch.long, device=dev)
        self.graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
        self.eos_key: tuple[int, ...] | None = None

    # -- the two device programs (captured on CUDA) -------------------------------------------------
    def _forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        kwargs = {self.decoder.cache_arg: self.cache}
        out = self.decoder.model(**inputs, **kwargs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _pick(self, logits: torch.Tensor) -> None:
        """``generate``'s greedy step: EOS barred before ``min_steps``, argmax, pad after EOS."""
        if self.eos.numel():
            logits = logits.masked_fill(self.eos_vocab & (self.step < self.min_steps), float("-inf"))
        picked = logits.argmax(dim=-1)
        picked = torch.where(self.unfinished, picked, self.pad)
        self.lengths += self.unfinished  # this step's token (an EOS too) counts for unfinished rows
        if self.eos.numel():
            # Not torch.isin: its sort-based branch is not guaranteed free of host syncs.
            self.unfinished &= ~(picked[:, None] == self.eos[None, :]).any(dim=1)
        self.out.index_copy_(1, self.step.view(1), picked.view(-1, 1))
        self.token.copy_(picked.view(-1, 1))
        self.step += 1

    def _advance_mask(self) -> None:
        # The key slot of the token about to be fed opens; positions are equal across rows (no padding).
        self.open_keys.index_fill_(3, self.position[0], True)
        if self.step_mask is not self.open_keys:  # eager attention: a float copy of the bool mask
            self.step_mask.copy_(self.decoder.mask_from_bool(self.open_keys))

    def prefill(self) -> None:
        logits = self._forward(
            inputs_embeds=self.embeds, attention_mask=self.prefill_mask, position_ids=self.prefill_positions
        )
        self._pick(logits)
        # The first fed token sits right after the prompt; its key slot and the prompt's are open.
        self.position.fill_(self.prompt)
        self.open_keys[..., : self.prompt] = True

    def decode_step(self) -> None:
        self._advance_mask()
        logits = self._forward(
            input_ids=self.token, attention_mask=self.step_mask, position_ids=self.position
        )
        self._pick(logits)
        self.position += 1

    # -- host side ----------------------------------------------------------------------------------
    def reset(self, embeds: torch.Tensor, plan: GreedyPlan) -> None:
        self.embeds.copy_(embeds)
        self.cache.reset()
        self.open_keys.zero_()
        self.step.zero_()
        self.position.zero_()
        self.unfinished.fill_(True)
        self.lengths.zero_()
        self.out.fill_(plan.pad_token_id)
        self.min_steps.fill_(plan.min_new_tokens)
        self.pad.fill_(plan.pad_token_id)
        if plan.eos_token_ids != self.eos_key:
            # A new EOS set changes the programs' shapes: recapture.
            self.eos = torch.tensor(plan.eos_token_ids, dtype=torch.long, device=self.decoder.device)
            vocab = torch.arange(self.decoder.vocab_size, device=self.decoder.device)
            self.eos_vocab = torch.isin(vocab, self.eos)  # (V,) which logits are EOS
            self.eos_key = plan.eos_token_ids
            self.graphs = None

    def capture(self, embeds: torch.Tensor, plan: GreedyPlan) -> None:
        """Warm up on a side stream (allocates the cache, picks kernels), then record both programs."""
        pool = self.decoder.graph_pool
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.reset(embeds, plan)
                self.prefill()
                self.decode_step()
        torch.cuda.current_stream().wait_stream(side)
        self.reset(embeds, plan)
        prefill_graph, step_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # thread_local: the API searches the vector index on other threads while this one captures.
        with torch.cuda.graph(prefill_graph, pool=pool, capture_error_mode="thread_local"):
            self.prefill()
        with torch.cuda.graph(step_graph, pool=pool, capture_error_mode="thread_local"):
            self.decode_step()
        self.graphs = (prefill_graph, step_graph)

    def run(self, embeds: torch.Tensor, plan: GreedyPlan, rows: int) -> torch.Tensor:
        self.reset(embeds, plan)
        prefill, step = self.prefill, self.decode_step
        if self.decoder.use_cuda_graphs and self.graphs is None:
            try:
                self.capture(embeds, plan)
            except RuntimeError as exc:  # still exact without graphs, only slower
                log.warning("CUDA graph capture of the decode step failed (%s); decoding eagerly", exc)
                self.decoder.use_cuda_graphs = False
            self.reset(embeds, plan)
        if self.decoder.use_cuda_graphs:
            assert self.graphs is not None  # captured above
            prefill, step = self.graphs[0].replay, self.graphs[1].replay
        prefill()
        done = 1
        check = self.decoder.check_every
        while done < plan.max_new_tokens:
            # generate stops once every row has finished; checking costs a host sync, so not every step.
            if plan.eos_token_ids and done % check == 0 and not bool(self.unfinished.any()):
                break
            step()
            done += 1
        # generate's output ends at the step where the last row finished (or at max_new_tokens).
        return self.out[:rows, : int(self.lengths[:rows].max())].clone()


class GreedyDecoder:
    """Greedy decoding equal to ``model.generate(inputs_embeds=..., input_ids=...)`` token for token.

    ``model`` is a causal LM (the BLIP-2 caption model's ``language_model``). ``use_cuda_graphs``
    defaults to on for a CUDA model. Shapes seen are kept (``max_shapes``, least recently used first
    out); batches are padded up to a power of two and cache lengths up to a multiple of 32 so a few
    graphs serve every request.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        use_cuda_graphs: bool | None = None,
        max_shapes: int = 4,
        check_every: int = 4,
    ) -> None:
        self.model = model
        self.device = model.device
        embeddings: Any = model.get_input_embeddings()
        self.dtype: torch.dtype = embeddings.weight.dtype
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        if self.use_cuda_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.max_shapes = max_shapes
        self.check_every = check_every
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.attn_implementation = model.config._attn_implementation
        self._runners: OrderedDict[tuple[int, int, int], _Runner] = OrderedDict()

    def clear(self) -> None:
        """Drop every cached shape (call after the model's weights were moved or re-cast: the graphs
        read the old storage)."""
        self._runners.clear()

    @property
    def supported(self) -> bool:
        """False for attention implementations whose mask format this decoder does not build."""
        return self.attn_implementation in MASKED_ATTENTION

    def mask_from_bool(self, allowed: torch.Tensor) -> torch.Tensor:
        return mask_for(allowed, self.attn_implementation, self.dtype)

    def _runner(self, batch: int, prompt: int, new_tokens: int) -> _Runner:
        if self.use_cuda_graphs:
            batch = 1 << (batch - 1).bit_length()
        cache_len = _round_up(prompt + new_tokens, 32 if self.use_cuda_graphs else 1)
        key = (batch, prompt, cache_len)
        runner = self._runners.pop(key, None) or _Runner(self, *key)
        self._runners[key] = runner
        while len(self._runners) > self.max_shapes:
            self._runners.popitem(last=False)
        return runner

    @torch.inference_mode()
    def generate(self, inputs_embeds: torch.Tensor, plan: GreedyPlan) -> torch.Tensor:
        """New tokens (B, n), n <= ``plan.max_new_tokens``; rows that finished early end in padding."""
        if not self.supported:
            raise RuntimeError(f"no static decoding for attention {self.model.config._attn_implementation!r}")
        b, p, _ = inputs_embeds.shape
        runner = self._runner(b, p, plan.max_new_tokens)
        embeds = inputs_embeds.to(self.dtype)
        if runner.batch > b:
            # Padding rows repeat the last real one; rows never interact, and their tokens are dropped.
            embeds = torch.cat([embeds, embeds[-1:].expand(runner.batch - b, -1, -1)])
        return runner.run(embeds, plan, b)
