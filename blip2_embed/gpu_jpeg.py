"""JPEG decoding on the GPU (nvJPEG through torchvision) into uint8 model inputs, beside the CPU path.

On a 16-core machine the CPU decoders feed the GPU ~150 camera photos a second while the GPU could embed
~1,000: decoding is the indexer's bottleneck. :class:`GpuJpegDecoder` takes a batch of file bytes and
returns uint8 ``(N, 3, S, S)`` pixels on the GPU, the same layout the CPU workers ship, so both feed
one model batch:

- **Routing** (:func:`gpu_route`, header only, no pixel decode): baseline and extended-sequential JPEGs
  with 1 or 3 components (YCbCr or grey), complete (ending in EOI) and within the pixel limit go to the
  GPU. Progressive, arithmetic-coded, CMYK/YCCK, Adobe-RGB and damaged JPEGs, and every other format,
  stay on the CPU path (``blip2_embed.images``), which names their errors.
- **Decode**: ``torchvision.io.decode_jpeg(device="cuda")`` on the whole batch (one bad file retries the
  rest one by one; a file nvJPEG still refuses goes to the CPU). EXIF orientation is applied on the GPU.
- **Resize** to S x S: separable antialiased bicubic (``torch.nn.functional.interpolate``), horizontal
  then vertical with rounding to uint8 in between, which is how Pillow resizes 8-bit images: on the same
  decoded pixels it equals ``Image.resize(BICUBIC)`` to at most 1 level
  (tests/blip2_embed/test_gpu_jpeg.py). With
  ``box_reduce`` the image is first averaged down by a power of two to >= 2S (like the CPU path's DCT
  draft), which moves less memory; docs/indexer.md gives the measured differences.

Without torchvision, or without CUDA, nothing here touches the GPU: :func:`decode_batch` then decodes
every file on the CPU (the same uint8 result the workers make), so callers need one code path.
torchvision is the optional ``gpu`` dependency; the CPU install never pulls it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from blip2_embed.errors import ImageError
from blip2_embed.images import (
    DEFAULT_MAX_PIXELS,
    ImageMetadata,
    ImageSpec,
    load_image_with_metadata,
    read_metadata,
    sniff_format,
)
from blip2_embed.images.preprocess import normalisation_table
from blip2_embed.images.sniff import looks_truncated

log = logging.getLogger(__name__)

# Start-of-frame markers nvJPEG decodes: baseline and extended sequential Huffman DCT.
_GPU_SOF = frozenset({0xC0, 0xC1})
# Every other SOFn (progressive, lossless, arithmetic-coded, hierarchical) ends the header walk too.
_ALL_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@lru_cache(maxsize=1)
def _torchvision_decode() -> tuple[Callable[..., Any], Any] | None:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:  # not installed, or built for another torch: both mean "CPU path"
        log.info("torchvision is not usable (%s): JPEGs are decoded on the CPU", exc)
        return None
    return decode_jpeg, ImageReadMode.RGB


def gpu_decode_available(device: str | torch.device) -> bool:
    """True when JPEGs can be decoded on ``device``: a CUDA device and a working torchvision."""
    return (
        torch.device(device).type == "cuda"
        and torch.cuda.is_available()
        and _torchvision_decode() is not None
    )


def _start_of_frame(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, component count) from walking the JPEG segments, or None if none is found."""
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in _ALL_SOF:
            if pos + 10 > n:
                return None
            return marker, data[pos + 9]
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a JPEG we know
            return None
        pos += 2 + length
    return None


@dataclass(frozen=True)
class GpuRoute:
    """A file nvJPEG can take: its EXIF orientation (applied after decoding) and metadata."""

    orientation: int
    metadata: ImageMetadata


def gpu_route(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> GpuRoute | None:
    """Whether ``data`` goes to nvJPEG (a :class:`GpuRoute`) or stays on the CPU path (``None``).

    Reads headers only. Anything unusual returns ``None``: the CPU path decodes it or raises the
    right :class:`ImageError`, so the GPU path never has to name a failure.
    """
    if sniff_format(data[:64]) != "jpeg" or looks_truncated(data, "jpeg"):
        return None
    sof = _start_of_frame(data)
    if sof is None or sof[0] not in _GPU_SOF or sof[1] not in (1, 3):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG", "MPO"]) as raw:
            width, height = raw.size
            if width * height > max_pixels or raw.mode not in ("RGB", "L"):
                return None
            if raw.info.get("adobe_transform") == 0 and raw.mode == "RGB":
                return None  # RGB stored without the YCbCr transform: leave it to libjpeg
            meta = read_metadata(raw)
            exif = raw.getexif()
            orientation = exif.get(0x0112, 1) if exif is not None else 1
    except Exception:
        return None
    return GpuRoute(orientation if orientation in range(1, 9) else 1, meta)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``(C, H, W)`` turned upright for an EXIF orientation, as ``load_image`` turns a PIL image."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def resize_uint8(image: torch.Tensor, size: int, *, box_reduce: bool = False) -> torch.Tensor:
    """uint8 ``(3, H, W)`` -> uint8 ``(3, size, size)``, as Pillow's BICUBIC resize of 8-bit RGB.

    Pillow resizes in two passes with an 8-bit image in between; doing the same with antialiased
    bicubic (Pillow's kernel, a = -0.5) gives its pixels exactly when Pillow runs the horizontal pass
    first, and within 1 level (a tenth of the pixels) when it starts with the vertical one, as Pillow
    13 does for images more than about 1.8x taller than wide. ``box_reduce`` first averages
    power-of-two blocks while both sides stay >= 2 * size.
    """
    x = image[None].float()
    if box_reduce:
        f = 1
        while min(x.shape[-2:]) // (2 * f) >= 2 * size:
            f *= 2
        if f > 1:
            x = F.avg_pool2d(x, f, f, ceil_mode=True, count_include_pad=False)
    x = F.interpolate(x, size=(x.shape[-2], size), mode="bicubic", antialias=True, align_corners=False)
    x = x.round_().clamp_(0, 255)
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255)[0].to(torch.uint8)


def to_model_input(pixels: torch.Tensor, spec: ImageSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``(N, 3, S, S)`` -> normalised model input, bit-identical to ``images.preprocess``.

    The per-channel table of ``preprocess`` (transformers' arithmetic for each of the 256 levels) is
    gathered on the tensor's device.
    """
    table = torch.from_numpy(normalisation_table(spec)).to(pixels.device)  # (3, 256)
    idx = pixels.long()
    out = torch.stack([table[c][idx[:, c]] for c in range(3)], dim=1)
    return out.to(dtype)


@dataclass
class DecodedBatch:
    """uint8 ``pixels`` (N, 3, S, S) on ``device`` for the files that decoded (row order = ``ok``),
    their metadata, the errors of those that did not, and which rows came from the GPU."""

    pixels: torch.Tensor
    ok: list[int]
    metadata: list[ImageMetadata]
    errors: dict[int, ImageError] = field(default_factory=dict)
    on_gpu: list[bool] = field(default_factory=list)


def cpu_uint8(
    data: bytes, spec: ImageSpec, *, fast_jpeg: bool, max_pixels: int
) -> tuple[np.ndarray, ImageMetadata]:
    """The CPU path: decode (DCT draft with ``fast_jpeg``), PIL bicubic resize: uint8 (3, S, S)."""
    draft = 2 * spec.size if fast_jpeg else None
    image, meta = load_image_with_metadata(data, max_pixels=max_pixels, draft_size=draft)
    resized = np.asarray(image.resize((spec.size, spec.size), resample=spec.resample))
    return np.ascontiguousarray(resized.transpose(2, 0, 1)), meta


class GpuJpegDecoder:
    """Decodes batches of file bytes into uint8 model inputs on ``device``; see the module docstring.

    ``enabled`` is False (and everything is decoded on the CPU) without CUDA or torchvision.
    ``nvjpeg`` replaces torchvision's ``decode_jpeg`` (same signature: a list of byte tensors, a read
    mode, a device): the tests run this class's GPU branch on the CPU through a libjpeg stand-in.
    """

    def __init__(
        self,
        spec: ImageSpec,
        device: str | torch.device = "cuda",
        *,
        fast_jpeg: bool = True,
        box_reduce: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        nvjpeg: Callable[..., Any] | None = None,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.fast_jpeg = fast_jpeg
        self.box_reduce = box_reduce
        self.max_pixels = max_pixels
        found = _torchvision_decode()
        self._decode_jpeg: Callable[..., Any] | None
        self._rgb: Any
        if nvjpeg is not None:
            self._decode_jpeg, self._rgb, self.enabled = nvjpeg, "RGB", True
        else:
            self._decode_jpeg, self._rgb = found if found is not None else (None, None)
            self.enabled = gpu_decode_available(self.device)
        if spec.resample != int(Image.Resampling.BICUBIC):
            self.enabled = False  # the GPU resize reproduces Pillow's bicubic only

    def _nvjpeg(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        """nvJPEG on a batch; if the batch call fails, each file alone (None: this one failed)."""
        decode_jpeg, rgb = self._decode_jpeg, self._rgb
        assert decode_jpeg is not None  # only called when enabled
        inputs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            return list(decode_jpeg(inputs, mode=rgb, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for x in inputs:
                try:
                    out.append(decode_jpeg(x, mode=rgb, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def decode(self, datas: Sequence[bytes]) -> DecodedBatch:
        """Every file of ``datas``: nvJPEG where :func:`gpu_route` allows, else the CPU path."""
        s = self.spec.size
        rows: dict[int, torch.Tensor] = {}
        metas: dict[int, ImageMetadata] = {}
        errors: dict[int, ImageError] = {}
        gpu_rows: set[int] = set()
        routes = {i: gpu_route(d, self.max_pixels) for i, d in enumerate(datas)} if self.enabled else {}
        todo = [i for i, r in routes.items() if r is not None]
        if todo:
            for i, image in zip(todo, self._nvjpeg([datas[i] for i in todo]), strict=True):
                if image is None:
                    continue
                route = routes[i]
                assert route is not None  # `todo` holds routed rows only
                rows[i] = resize_uint8(orient(image, route.orientation), s, box_reduce=self.box_reduce)
                metas[i] = route.metadata
                gpu_rows.add(i)
        for i, data in enumerate(datas):
            if i in rows:
                continue
            try:
                pixels, meta = cpu_uint8(
                    data, self.spec, fast_jpeg=self.fast_jpeg, max_pixels=self.max_pixels
                )
            except ImageError as exc:
                errors[i] = exc
                continue
            rows[i] = torch.from_numpy(pixels).to(self.device)
            metas[i] = meta
        ok = sorted(rows)
        batch = torch.stack([rows[i] for i in ok]) if ok else torch.zeros(0, 3, s, s, dtype=torch.uint8)
        return DecodedBatch(
            pixels=batch.to(self.device),
            ok=ok,
            metadata=[metas[i] for i in ok],
            errors=errors,
            on_gpu=[i in gpu_rows for i in ok],
        )


def decode_batch(
    datas: Sequence[bytes],
    spec: ImageSpec,
    device: str | torch.device = "cuda",
    **options: Any,
) -> DecodedBatch:
    """One-call form of :class:`GpuJpegDecoder` (``options``: fast_jpeg, box_reduce, max_pixels)."""
    return GpuJpegDecoder(spec, device, **options).decode(datas)
