"""blip2_embed.gpu_jpeg on the CPU: routing, orientation, the resize against Pillow, the fallback.

nvJPEG itself needs a GPU (bench/gpu_suite.py measures it there). Here its place is taken by a libjpeg
stand-in with decode_jpeg's signature, so everything around it -- which files go to the GPU, batch
failures retried one by one, orientation, resize, the CPU fallback and its errors -- runs for real.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_embed.errors import CorruptImageError, TruncatedImageError
from blip2_embed.gpu_jpeg import (
    GpuJpegDecoder,
    decode_batch,
    gpu_decode_available,
    gpu_route,
    orient,
    resize_uint8,
    to_model_input,
)
from blip2_embed.images import ImageSpec, decode_for_model, preprocess
from tests.support.images import asymmetric_rgb, encode, exif_bytes, photo_like

SPEC = ImageSpec(size=64)


def jpeg(width: int = 320, height: int = 240, seed: int = 0, **params) -> bytes:
    return encode(Image.fromarray(photo_like(width, height, seed)), "JPEG", quality=90, **params)


def without_segment(data: bytes, marker: int) -> bytes:
    """The JPEG with every header segment of one marker type removed."""
    out, pos = bytearray(data[:2]), 2
    while pos < len(data):
        kind, length = data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if kind == 0xDA:  # start of scan: the rest is entropy-coded data
            return bytes(out + data[pos:])
        if kind != marker:
            out += data[pos : pos + 2 + length]
        pos += 2 + length
    return bytes(out)


def pil_decode_jpeg(inputs, mode, device):
    """decode_jpeg's contract on libjpeg: full-size RGB (3, H, W) uint8; a bad file fails the batch."""

    def one(x: torch.Tensor) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(x.numpy().tobytes())) as im:
                rgb = np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise RuntimeError(f"decode failed: {exc}") from exc
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(device)

    return [one(x) for x in inputs] if isinstance(inputs, list) else one(inputs)


def test_routing_sends_only_plain_complete_jpegs_to_the_gpu():
    baseline = jpeg()
    assert gpu_route(baseline) is not None
    grey = encode(Image.fromarray(photo_like(64, 48)).convert("L"), "JPEG")
    assert gpu_route(grey) is not None
    assert gpu_route(jpeg(progressive=True)) is None
    assert gpu_route(encode(Image.fromarray(photo_like(64, 48)).convert("CMYK"), "JPEG")) is None
    assert gpu_route(encode(Image.fromarray(photo_like(64, 48)), "PNG")) is None
    assert gpu_route(baseline[: len(baseline) // 2]) is None  # truncated: the CPU path names it
    assert gpu_route(baseline, max_pixels=320 * 240 - 1) is None  # over the limit: likewise
    assert gpu_route(b"not an image at all") is None
    rotated = gpu_route(jpeg(exif=exif_bytes(orientation=6)))
    assert rotated is not None and rotated.orientation == 6
    assert (rotated.metadata.width, rotated.metadata.height) == (240, 320)  # as displayed


def test_orientation_equals_pil_transposes():
    rgb = asymmetric_rgb(9, 5)
    from blip2_embed.images.decode import _UPRIGHT

    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    for orientation, op in _UPRIGHT.items():
        expected = np.asarray(Image.fromarray(rgb).transpose(op))
        got = orient(tensor, orientation).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"orientation {orientation}")


@pytest.mark.parametrize(("width", "height"), [(640, 480), (300, 700), (23, 57), (64, 64)])
def test_resize_equals_pillow_bicubic_within_one_level(width, height):
    rgb = photo_like(width, height, seed=width)
    expected = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.Resampling.BICUBIC)).astype(int)
    got = resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1), 64).permute(1, 2, 0).numpy().astype(int)
    diff = np.abs(got - expected)
    # Pillow rounds to 8 bits between its two passes; it takes the vertical one first for some tall
    # images (300x700 here), which moves a tenth of the pixels by one level. Otherwise it is exact.
    assert diff.max() <= 1 and diff.mean() < (0.2 if height > 1.8 * width else 0.01), diff.mean()
    # Box pre-reduction (the DCT-draft analogue) stays within a fraction of a level on average.
    boxed = resize_uint8(torch.from_numpy(rgb).permute(2, 0, 1), 64, box_reduce=True).permute(1, 2, 0)
    assert np.abs(boxed.numpy().astype(int) - expected).mean() < 0.5


def test_uint8_to_model_input_is_bit_identical_to_preprocess():
    rgb = photo_like(64, 64, seed=3)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    np.testing.assert_array_equal(
        to_model_input(pixels, SPEC).numpy(), preprocess([Image.fromarray(rgb)], SPEC)
    )


def test_without_cuda_or_torchvision_everything_takes_the_cpu_path():
    assert not gpu_decode_available("cpu")
    assert not GpuJpegDecoder(SPEC, "cuda").enabled  # no GPU (and no torchvision) here
    files = [jpeg(seed=1), encode(Image.fromarray(photo_like(50, 40)), "PNG"), jpeg(seed=2)[:500], b"hello"]
    out = decode_batch(files, SPEC, "cpu")
    assert out.ok == [0, 1] and out.on_gpu == [False, False]
    assert isinstance(out.errors[2], TruncatedImageError) and 3 in out.errors
    for row, i in enumerate(out.ok):
        expected = decode_for_model(files[i], SPEC, fast_jpeg=True)
        np.testing.assert_array_equal(to_model_input(out.pixels[row : row + 1], SPEC)[0].numpy(), expected)


def test_gpu_branch_routes_retries_and_falls_back():
    good = [jpeg(seed=s) for s in range(3)]
    rotated = jpeg(400, 300, seed=5, exif=exif_bytes(orientation=8))
    # A complete baseline JPEG without its quantisation tables: the routing (headers only) passes it,
    # the decoder refuses it.
    broken = without_segment(jpeg(seed=9), 0xDB)
    files = [good[0], jpeg(seed=4, progressive=True), good[1], broken, rotated, good[2]]
    calls: list[int] = []

    def stand_in(inputs, mode, device):
        calls.append(len(inputs) if isinstance(inputs, list) else 1)
        return pil_decode_jpeg(inputs, mode, device)

    decoder = GpuJpegDecoder(SPEC, "cpu", nvjpeg=stand_in)
    assert gpu_route(broken) is not None
    out = decoder.decode(files)
    # One batch of the five routed files fails on the broken one, then each is tried alone.
    assert calls == [5, 1, 1, 1, 1, 1]
    assert out.ok == [0, 1, 2, 4, 5] and out.on_gpu == [True, False, True, True, True]
    assert isinstance(out.errors[3], CorruptImageError)  # named by the CPU path
    assert (out.metadata[3].width, out.metadata[3].height) == (300, 400)
    for row, i in enumerate(out.ok):
        exact = decode_for_model(files[i], SPEC, fast_jpeg=False)
        got = to_model_input(out.pixels[row : row + 1], SPEC)[0].numpy()
        # The GPU rows resize the full decode (the exact CPU path, within a level); the progressive row
        # took the CPU fast path (DCT draft), a few tenths of a level from exact on average.
        step = 1 / 255 / min(SPEC.std)
        assert np.abs(got - exact).max() <= (1.01 * step if out.on_gpu[row] else 16 * step)
