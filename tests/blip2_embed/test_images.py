"""Image decoding and preprocessing: real files on disk, compared against transformers and known pixels."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from blip2_embed import images
from blip2_embed.errors import (
    CorruptImageError,
    DecompressionBombError,
    EmptyImageError,
    ImageError,
    ModelNotFoundError,
    NotAnImageError,
    TruncatedImageError,
    UnreadableImageError,
    UnsupportedImageError,
)
from blip2_embed.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImageSpec,
    decode_for_model,
    decode_model_input,
    draft_size_for,
    load_image,
    load_image_with_metadata,
    make_thumbnail,
    normalise,
    preprocess,
    read_metadata,
    resize_for_model,
    sniff_format,
)
from tests.support.images import (
    CORRUPT_EXIF_PAYLOADS,
    asymmetric_rgb,
    encode,
    exif_bytes,
    photo_like,
    png_header_only,
    stored_for_orientation,
    with_app1,
)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int16)


# --------------------------------------------------------------------------------------------------
# preprocess == transformers' BlipImageProcessor


def reference_processor(size: int, spec: ImageSpec | None = None):
    """transformers' PIL-backend BLIP processor: the pipeline `preprocess` must reproduce."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    spec = spec or ImageSpec(size=size)
    return BlipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=list(spec.mean), image_std=list(spec.std)
    )


RGB_SIZES = [(640, 480), (480, 640), (224, 224), (37, 53), (1000, 90), (3, 5), (225, 223)]


@pytest.mark.parametrize("size", [224, 32])
def test_preprocess_equals_blip_image_processor(size: int) -> None:
    rng = np.random.default_rng(size)
    # alternate smooth photo-like content and white noise (the worst case for resampling differences)
    arrays = [
        photo_like(w, h, seed=i) if i % 2 else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for i, (w, h) in enumerate(RGB_SIZES)
    ]
    batch = [Image.fromarray(a) for a in arrays]
    expected = reference_processor(size)(images=batch, return_tensors="np")["pixel_values"]
    ours = preprocess(batch, ImageSpec(size=size))
    assert ours.dtype == np.float32
    assert ours.shape == (len(batch), 3, size, size) == expected.shape
    assert np.abs(ours - expected).max() <= 1e-5


@settings(max_examples=15, deadline=None)
@given(
    width=st.integers(1, 120),
    height=st.integers(1, 120),
    seed=st.integers(0, 2**16),
    size=st.sampled_from([16, 32, 40]),
)
def test_preprocess_equals_reference_on_random_images(width: int, height: int, seed: int, size: int) -> None:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    expected = reference_processor(size)(images=[image], return_tensors="np")["pixel_values"]
    assert np.abs(preprocess([image], ImageSpec(size=size)) - expected).max() <= 1e-5


def test_preprocess_matches_processor_with_custom_statistics() -> None:
    spec = ImageSpec(size=24, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    image = Image.fromarray(photo_like(70, 50))
    expected = reference_processor(24, spec)(images=[image], return_tensors="np")["pixel_values"]
    assert np.abs(preprocess([image], spec) - expected).max() <= 1e-5


def test_generic_blip_image_processor_falls_back_to_pil_without_torchvision() -> None:
    # transformers 5.x: BlipImageProcessor is the torchvision backend; without torchvision it builds the PIL
    # one (with a warning). Where torchvision is installed its bicubic differs slightly from PIL's.
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision installed: BlipImageProcessor is the torchvision backend")
    from transformers import BlipImageProcessor

    processor = BlipImageProcessor(size={"height": 32, "width": 32})
    assert type(processor).__name__ == "BlipImageProcessorPil"
    image = Image.fromarray(photo_like(90, 60))
    expected = processor(images=[image], return_tensors="np")["pixel_values"]
    assert np.abs(preprocess([image], ImageSpec(size=32)) - expected).max() <= 1e-5


def test_preprocess_empty_batch() -> None:
    assert preprocess([], ImageSpec(size=32)).shape == (0, 3, 32, 32)


def test_resize_then_normalise_is_the_processor_bit_for_bit() -> None:
    """The two halves the catalog stores between: uint8 S x S RGB, then a gather."""
    spec = ImageSpec(size=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    batch = [Image.fromarray(photo_like(w, h, seed=w)) for w, h in RGB_SIZES] + [
        Image.fromarray(photo_like(30, 20)).convert("RGBA"),  # converted as load_image does
        Image.fromarray(photo_like(30, 20)).convert("L"),
    ]
    inputs = np.stack([resize_for_model(image, spec) for image in batch])
    assert inputs.dtype == np.uint8 and inputs.shape == (len(batch), 40, 40, 3)
    expected = reference_processor(40, spec)(images=batch, return_tensors="np")["pixel_values"]
    assert np.array_equal(normalise(inputs, spec), expected.astype(np.float32))
    assert np.array_equal(preprocess(batch, spec), normalise(inputs, spec))
    with pytest.raises(ValueError, match="uint8"):
        normalise(inputs.astype(np.float32), spec)
    with pytest.raises(ValueError, match="uint8"):
        normalise(inputs[0], spec)  # one image needs its batch axis


def test_decode_model_input_is_the_indexer_decode(tmp_path: Path) -> None:
    spec = ImageSpec(size=32)
    path = write(
        tmp_path, "p.jpg", encode(Image.fromarray(photo_like(1200, 900, seed=3)), "JPEG", quality=90)
    )
    # The JPEG draft target: 2*S, or the thumbnail side when larger; None without the fast path.
    assert draft_size_for(spec, fast_jpeg=True) == 64
    assert draft_size_for(spec, fast_jpeg=True, thumbnail_size=256) == 256
    assert draft_size_for(spec, fast_jpeg=False, thumbnail_size=256) is None
    exact = decode_model_input(path, spec, fast_jpeg=False)
    assert np.array_equal(exact, resize_for_model(load_image(path), spec))
    fast = decode_model_input(path, spec, fast_jpeg=True, thumbnail_size=256)
    assert np.array_equal(fast, resize_for_model(load_image(path, draft_size=256), spec))
    assert not np.array_equal(fast, exact)  # 1200x900 decodes at 1/2 scale for 256, at 1/8 for 64
    assert np.array_equal(
        decode_for_model(path, spec), normalise(decode_model_input(path, spec)[None], spec)[0]
    )


# --------------------------------------------------------------------------------------------------
# ImageSpec


def test_default_spec_is_blip2_224_with_clip_statistics() -> None:
    spec = ImageSpec.DEFAULT
    assert spec.size == 224
    assert spec.mean == (0.48145466, 0.4578275, 0.40821073) == CLIP_MEAN
    assert spec.std == (0.26862954, 0.26130258, 0.27577711) == CLIP_STD
    assert spec.resample == Image.Resampling.BICUBIC
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(spec) == hash(ImageSpec())


def test_spec_from_saved_transformers_processor(tmp_path: Path) -> None:
    spec = ImageSpec(size=48, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    reference_processor(48, spec).save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    assert ImageSpec.from_pretrained(tmp_path) == spec
    assert ImageSpec.from_pretrained(str(tmp_path / "preprocessor_config.json")) == spec


def test_spec_from_nested_processor_config_and_dicts(tmp_path: Path) -> None:
    nested = {"image_processor": {"size": {"height": 364, "width": 364}, "image_mean": CLIP_MEAN}}
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert ImageSpec.from_pretrained(tmp_path).size == 364
    assert ImageSpec.from_pretrained({"size": 96}).size == 96
    # absent keys take BlipImageProcessor's class defaults, as transformers would
    assert ImageSpec.from_pretrained({}).size == 384
    no_norm = ImageSpec.from_pretrained({"size": 8, "do_normalize": False, "do_rescale": False})
    assert (no_norm.mean, no_norm.std, no_norm.rescale_factor) == ((0, 0, 0), (1, 1, 1), 1.0)


def test_spec_config_round_trip_through_transformers() -> None:
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    spec = ImageSpec(size=40)
    config = spec.to_preprocessor_config()
    assert ImageSpec.from_pretrained(config) == spec
    config.pop("image_processor_type")
    processor = BlipImageProcessorPil(**config)
    image = Image.fromarray(photo_like(77, 31))
    expected = processor(images=[image], return_tensors="np")["pixel_values"]
    assert np.abs(preprocess([image], spec) - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "config",
    [{"size": {"height": 224, "width": 300}}, {"size": {"shortest_edge": 224}}, {"do_center_crop": True}],
)
def test_spec_rejects_configs_it_cannot_honour(config: dict) -> None:
    with pytest.raises(ValueError):
        ImageSpec.from_pretrained(config)


def test_spec_missing_config_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ImageSpec.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------
# Modes -> RGB


def test_rgba_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 10, 30)
    rgba[:, :4, 3] = 0  # left half fully transparent
    rgba[:, 4:6, 3] = 255  # opaque
    rgba[:, 6:, 3] = 128  # half
    image = load_image(write(tmp_path, "a.png", encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    out = pixels(image)
    assert (out[:, :4] == 255).all()
    assert (out[:, 4:6] == (200, 10, 30)).all()
    half = out[0, 6]
    expected = np.array([200, 10, 30]) * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(half - expected).max() <= 1


def test_la_composited_on_white(tmp_path: Path) -> None:
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0] = 40
    la[:2, :, 1] = 0
    la[2:, :, 1] = 255
    out = pixels(load_image(write(tmp_path, "la.png", encode(Image.fromarray(la, "LA"), "PNG"))))
    assert (out[:2] == 255).all() and (out[2:] == 40).all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_index_becomes_white(tmp_path: Path, fmt: str) -> None:
    p = Image.new("P", (6, 6), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 3, 6))  # left half colour 1 (blue), right half colour 0 (red)
    data = encode(p, fmt, transparency=1)
    out = pixels(load_image(write(tmp_path, f"p.{fmt.lower()}", data)))
    assert (out[:, :3] == 255).all()
    assert (out[:, 3:] == (255, 0, 0)).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
    cmyk.paste((255, 0, 0, 0), (0, 0, 8, 16))  # cyan | white
    path = write(tmp_path, "cmyk.jpg", encode(cmyk, "JPEG", quality=100))
    assert Image.open(path).mode == "CMYK"
    out = pixels(load_image(path))
    assert np.abs(out[4, 2] - (0, 255, 255)).max() <= 6
    assert np.abs(out[4, 13] - (255, 255, 255)).max() <= 6


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 257 * 100]], dtype=np.uint16)
    path = write(tmp_path, "g16.png", encode(Image.fromarray(values), "PNG"))
    assert Image.open(path).mode.startswith("I")
    out = pixels(load_image(path))
    assert out[0, :, 0].tolist() == [0, 128, 255, 100]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16_bit_big_endian_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 65535], [32768, 257 * 7]], dtype=">u2")
    image = Image.frombytes("I;16B", (2, 2), values.tobytes())
    out = pixels(load_image(write(tmp_path, "g16b.tif", encode(image, "TIFF"))))
    assert out[..., 0].tolist() == [[0, 255], [128, 7]]


def test_32_bit_int_out_of_16_bit_range_is_stretched(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[-10, 0, 10]], dtype=np.int32), "I")
    out = pixels(load_image(write(tmp_path, "i32.tif", encode(image, "TIFF"))))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_float_images(tmp_path: Path) -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    out = pixels(load_image(write(tmp_path, "f.tif", encode(unit, "TIFF"))))
    assert out[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1.0, 499.0, 999.0, np.nan]], dtype=np.float32), "F")
    out = pixels(load_image(write(tmp_path, "fw.tif", encode(wide, "TIFF"))))
    assert out[0, :3, 0].tolist() == [0, 128, 255]


def test_one_bit_and_grayscale(tmp_path: Path) -> None:
    bits = Image.fromarray(np.array([[0, 255, 0, 255]], dtype=np.uint8)).convert("1")
    out = pixels(load_image(write(tmp_path, "b.png", encode(bits, "PNG"))))
    assert out[0, :, 1].tolist() == [0, 255, 0, 255]
    gray = Image.fromarray(np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4), "L")
    out = pixels(load_image(write(tmp_path, "l.png", encode(gray, "PNG"))))
    assert out[..., 2].ravel().tolist() == list(range(0, 256, 16))


def test_lab_and_ycbcr_convert_colorimetrically(tmp_path: Path) -> None:
    lab = Image.new("LAB", (4, 4), (255, 128, 128))  # L=100, a=b=0: white
    out = pixels(load_image(write(tmp_path, "lab.tif", encode(lab, "TIFF"))))
    assert np.abs(out - 255).max() <= 2
    ycc = Image.new("YCbCr", (4, 4), (76, 85, 255))  # ~pure red in BT.601 full range
    path = write(tmp_path, "ycc.tif", encode(ycc, "TIFF"))
    assert Image.open(path).mode == "YCbCr"
    assert np.abs(pixels(load_image(path))[0, 0] - (254, 0, 0)).max() <= 3


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), colour) for colour in ("red", "lime", "blue")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    path = write(tmp_path, "anim.gif", data)
    assert Image.open(path).n_frames == 3
    assert (pixels(load_image(path)) == (255, 0, 0)).all()


def test_animated_webp_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("blue", "red")]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert (pixels(load_image(data)) == (0, 0, 255)).all()


# --------------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_exact(tmp_path: Path, orientation: int) -> None:
    upright = asymmetric_rgb()
    stored = Image.fromarray(np.ascontiguousarray(stored_for_orientation(upright, orientation)))
    data = encode(stored, "PNG", exif=exif_bytes(orientation=orientation))
    image, meta = load_image_with_metadata(write(tmp_path, f"o{orientation}.png", data))
    assert np.array_equal(np.asarray(image), upright)
    assert (meta.width, meta.height) == (upright.shape[1], upright.shape[0])
    # the returned pixels are upright: nothing left for a second exif_transpose to do
    from PIL import ImageOps

    assert np.array_equal(np.asarray(ImageOps.exif_transpose(image)), upright)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(tmp_path: Path, orientation: int) -> None:
    upright = asymmetric_rgb(64, 40)
    stored = Image.fromarray(np.ascontiguousarray(stored_for_orientation(upright, orientation)))
    data = encode(stored, "JPEG", quality=100, exif=exif_bytes(orientation=orientation))
    got = pixels(load_image(write(tmp_path, f"o{orientation}.jpg", data)))
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 2.0


def test_tiff_orientation_tag(tmp_path: Path) -> None:
    upright = asymmetric_rgb()
    stored = Image.fromarray(np.ascontiguousarray(stored_for_orientation(upright, 6)))
    data = encode(stored, "TIFF", tiffinfo={274: 6})
    assert np.array_equal(np.asarray(load_image(write(tmp_path, "o.tif", data))), upright)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP"])
def test_orientation_in_modern_containers_applied_once(tmp_path: Path, fmt: str) -> None:
    # pillow-heif applies HEIF rotations itself and resets the tag; Pillow's AVIF reader reports them as an
    # EXIF orientation. Either way the result must be upright exactly once.
    upright = asymmetric_rgb(64, 40)
    stored = Image.fromarray(np.ascontiguousarray(stored_for_orientation(upright, 6)))
    data = encode(stored, fmt, quality=100, exif=exif_bytes(orientation=6))
    image, meta = load_image_with_metadata(write(tmp_path, f"o6.{fmt.lower()}", data))
    got = pixels(image)
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 6.0
    assert (meta.width, meta.height) == (64, 40)


# --------------------------------------------------------------------------------------------------
# Formats and sniffing


FORMAT_CASES = {
    "jpeg": ("JPEG", {"quality": 95}),
    "png": ("PNG", {}),
    "webp": ("WEBP", {"lossless": True}),
    "heif": ("HEIF", {"quality": 95}),
    "avif": ("AVIF", {"quality": 95}),
    "tiff": ("TIFF", {}),
    "bmp": ("BMP", {}),
    "gif": ("GIF", {}),
}


@pytest.mark.parametrize("name", sorted(FORMAT_CASES))
def test_format_loads_and_is_sniffed_by_content(tmp_path: Path, name: str) -> None:
    fmt, params = FORMAT_CASES[name]
    source = asymmetric_rgb(40, 24)
    data = encode(Image.fromarray(source), fmt, **params)
    # a misleading extension: content decides
    path = write(tmp_path, "photo.txt", data)
    with path.open("rb") as fh:
        assert sniff_format(fh.read(images.SNIFF_BYTES)) == name
    image, meta = load_image_with_metadata(path)
    assert image.size == (40, 24) and image.mode == "RGB"
    assert meta.format == name
    tolerance = 0 if name in ("png", "webp", "tiff", "bmp") else 24
    if name != "gif":  # GIF quantises to a palette
        assert np.abs(pixels(image) - source).mean() <= max(tolerance, 0.5)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"", None),
        (b"hello, world\n" * 5, None),
        (b"BMW 320i service notes, Tuesday....", None),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2", None),  # an MP4 video
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf", "avif"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "heif"),
        (b"\x00\x00\x00\x14ftypmif1\x00\x00\x00\x00mif1", "heif"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"II+\x00\x08\x00\x00\x00", "tiff"),
        (b"\xff\xd8\xff\xe1", "jpeg"),
    ],
)
def test_sniff_format_signatures(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_sniff_format_never_raises(head: bytes) -> None:
    assert sniff_format(head) in {None, "jpeg", "png", "webp", "heif", "avif", "tiff", "bmp", "gif"}


def test_sources_path_bytes_and_stream_agree(tmp_path: Path) -> None:
    data = encode(Image.fromarray(asymmetric_rgb()), "PNG")
    path = write(tmp_path, "x.png", data)
    expected = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(load_image(str(path))), expected)
    assert np.array_equal(np.asarray(load_image(data)), expected)
    assert np.array_equal(np.asarray(load_image(bytearray(data))), expected)
    with path.open("rb") as fh:
        assert np.array_equal(np.asarray(load_image(fh)), expected)


# --------------------------------------------------------------------------------------------------
# Bad input -> typed errors


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.jpg", b"")
    with pytest.raises(EmptyImageError) as info:
        load_image(path)
    assert info.value.reason == "empty" and info.value.path == str(path)
    assert str(path) in str(info.value)
    with pytest.raises(EmptyImageError):
        load_image(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "HEIF", "AVIF", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_files(tmp_path: Path, fmt: str, keep: float) -> None:
    data = encode(Image.fromarray(photo_like(120, 90)), fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: int(len(data) * keep)])
    with pytest.raises(TruncatedImageError) as info:
        load_image(path)
    assert info.value.reason == "truncated"
    assert isinstance(info.value, ImageError) and isinstance(info.value, ValueError)


def test_file_cut_inside_the_header_is_truncated(tmp_path: Path) -> None:
    data = encode(Image.fromarray(photo_like(32, 32)), "PNG")
    with pytest.raises(TruncatedImageError):
        load_image(write(tmp_path, "head.png", data[:30]))


@pytest.mark.parametrize(
    "content",
    [b"just some notes\nnothing to see\n" * 10, np.random.default_rng(1).bytes(4096)],
    ids=["text", "random"],
)
def test_not_an_image(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(NotAnImageError) as info:
        load_image(write(tmp_path, "notes.jpg", content))
    assert info.value.reason == "not_an_image"


def test_decompression_bomb_limit(tmp_path: Path) -> None:
    path = write(tmp_path, "big.png", encode(Image.new("RGB", (100, 100)), "PNG"))
    with pytest.raises(DecompressionBombError) as info:
        load_image(path, max_pixels=1000)
    assert info.value.reason == "decompression_bomb"
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def test_decompression_bomb_checked_before_decoding(tmp_path: Path) -> None:
    # the header says 5000x5000 and the file ends right there: decoding would fail as truncated, so
    # getting the bomb error proves the size was checked first
    path = write(tmp_path, "header.png", png_header_only(5000, 5000))
    with pytest.raises(DecompressionBombError):
        load_image(path, max_pixels=1_000_000)
    with pytest.raises(TruncatedImageError):
        load_image(path, max_pixels=100_000_000)


def test_pixel_limit_is_independent_of_pillow_global(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "big.png", encode(Image.new("RGB", (100, 100)), "PNG"))
    before = Image.MAX_IMAGE_PIXELS
    load_image(path)
    assert before == Image.MAX_IMAGE_PIXELS  # we never touch it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # someone disabled Pillow's check
    with pytest.raises(DecompressionBombError):
        load_image(path, max_pixels=1000)


def test_pillow_own_bomb_error_is_typed(tmp_path: Path) -> None:
    path = write(tmp_path, "huge.png", png_header_only(20_000, 20_000))  # 400 MP, over Pillow's hard limit
    with pytest.raises(DecompressionBombError):
        load_image(path)


def test_missing_file_and_directory_are_unreadable(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.jpg", tmp_path):
        with pytest.raises(UnreadableImageError) as info:
            load_image(path)
        assert info.value.reason == "unreadable" and info.value.path == str(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_no_permission_is_unreadable(tmp_path: Path) -> None:
    path = write(tmp_path, "secret.png", encode(Image.new("RGB", (4, 4)), "PNG"))
    path.chmod(0)
    with pytest.raises(UnreadableImageError):
        load_image(path)


def test_failing_stream_is_unreadable() -> None:
    class BrokenStream(io.RawIOBase):
        name = "/mnt/nas/photo.jpg"

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            raise OSError(5, "Input/output error")

    with pytest.raises(UnreadableImageError) as info:
        load_image(BrokenStream())
    assert info.value.path == "/mnt/nas/photo.jpg" and "Input/output error" in str(info.value)


def test_known_but_unaccepted_format_is_unsupported(tmp_path: Path) -> None:
    path = write(tmp_path, "old.pcx", encode(Image.new("RGB", (8, 8), "red"), "PCX"))
    with pytest.raises(UnsupportedImageError) as info:
        load_image(path)
    assert info.value.reason == "unsupported" and "PCX" in str(info.value)


def test_format_without_decoder_is_unsupported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (8, 8), "red"), "HEIF")
    monkeypatch.setattr(images.sniff, "pil_formats", lambda: ("JPEG", "PNG"))  # as if pillow-heif were absent
    with pytest.raises(UnsupportedImageError):
        load_image(write(tmp_path, "x.heic", data))


def test_corrupt_png_data_is_corrupt(tmp_path: Path) -> None:
    data = bytearray(encode(Image.fromarray(photo_like(64, 64)), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 40] = b"\x00" * 40  # damage the deflate stream, keep the length intact
    with pytest.raises(CorruptImageError) as info:
        load_image(write(tmp_path, "bad.png", bytes(data)))
    assert info.value.reason == "corrupt"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")  # Pillow's own, expected here
@pytest.mark.parametrize("kind", sorted(CORRUPT_EXIF_PAYLOADS))
def test_corrupt_exif_does_not_fail_the_decode(tmp_path: Path, kind: str) -> None:
    upright = asymmetric_rgb()
    jpeg = encode(Image.fromarray(upright), "JPEG", quality=100)
    path = write(tmp_path, "bad-exif.jpg", with_app1(jpeg, CORRUPT_EXIF_PAYLOADS[kind]))
    image, meta = load_image_with_metadata(path)
    got = pixels(image)
    if kind == "entry_count_past_end":
        # the first entry (orientation 6) is readable before the table runs off the end; honouring it is fine
        assert got.shape in (upright.shape, (upright.shape[1], upright.shape[0], 3))
    else:
        assert got.shape == upright.shape and np.abs(got - upright).mean() < 2.0
    assert meta.captured_at is None and meta.camera_make is None


def test_errors_survive_pickling() -> None:
    for error in (
        TruncatedImageError("ends early", "/photos/a.jpg"),
        EmptyImageError("", None),
        DecompressionBombError("too big", "/x.png"),
        ModelNotFoundError("Salesforce/blip2-itm-vit-g"),
        ModelNotFoundError("m", "custom message"),
    ):
        clone = pickle.loads(pickle.dumps(error))
        assert type(clone) is type(error) and str(clone) == str(error)
        if isinstance(error, ImageError):
            assert (clone.reason, clone.path, clone.detail) == (error.reason, error.path, error.detail)
        else:
            assert clone.model == error.model
    assert "blip2-itm-vit-g" in str(ModelNotFoundError("Salesforce/blip2-itm-vit-g"))


def test_lenient_pillow_setting_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = encode(Image.fromarray(photo_like(256, 192)), "JPEG")
    path = write(tmp_path, "cut.jpg", data[: len(data) * 2 // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(images.decode, "_warned_truncated_loading", False)
    with caplog.at_level(logging.WARNING, logger="blip2_embed.images"):
        load_image(path)
    assert "LOAD_TRUNCATED_IMAGES" in caplog.text
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    with pytest.raises(TruncatedImageError):
        load_image(path)


def test_worker_process_returns_pixels_and_typed_errors(tmp_path: Path) -> None:
    good = write(tmp_path, "good.jpg", encode(Image.fromarray(photo_like(300, 200)), "JPEG"))
    bad = write(tmp_path, "bad.jpg", good.read_bytes()[:500])
    spec = ImageSpec(size=32)
    with ProcessPoolExecutor(max_workers=1) as pool:
        result = pool.submit(decode_for_model, str(good), spec).result()
        failure = pool.submit(decode_for_model, str(bad), spec)
        with pytest.raises(TruncatedImageError) as info:
            failure.result()
    assert result.shape == (3, 32, 32) and result.dtype == np.float32
    assert np.array_equal(result, decode_for_model(good, spec))
    assert info.value.path == str(bad)


# --------------------------------------------------------------------------------------------------
# Fast JPEG (DCT-scaled) path


def test_fast_jpeg_draft_keeps_both_sides_above_target(tmp_path: Path) -> None:
    spec = ImageSpec.DEFAULT
    photo = Image.fromarray(photo_like(2400, 1800, seed=5))
    path = write(tmp_path, "big.jpg", encode(photo, "JPEG", quality=90))
    image, meta = load_image_with_metadata(path, draft_size=2 * spec.size)
    assert min(image.size) >= 2 * spec.size
    assert image.size == (600, 450)  # 1/4 scale: the smallest that keeps both sides >= 448
    assert (meta.width, meta.height) == (2400, 1800)

    fast = decode_for_model(path, spec, fast_jpeg=True)
    exact = decode_for_model(path, spec, fast_jpeg=False)
    assert np.array_equal(exact, preprocess([load_image(path)], spec)[0])
    diff = np.abs(fast - exact)
    print(f"fast vs exact JPEG: mean abs diff {diff.mean():.5f}, max {diff.max():.4f} (normalised units)")
    assert diff.mean() < 0.05
    cosine = float(fast.ravel() @ exact.ravel() / (np.linalg.norm(fast) * np.linalg.norm(exact)))
    assert cosine > 0.999


def test_fast_jpeg_with_rotation_and_non_jpeg_untouched(tmp_path: Path) -> None:
    upright = photo_like(1000, 1400, seed=2)
    stored = Image.fromarray(np.ascontiguousarray(stored_for_orientation(upright, 6)))
    jpeg = write(tmp_path, "r.jpg", encode(stored, "JPEG", quality=95, exif=exif_bytes(orientation=6)))
    image, meta = load_image_with_metadata(jpeg, draft_size=200)
    assert image.size == (250, 350)  # 1/4 of the upright 1000x1400
    assert (meta.width, meta.height) == (1000, 1400)
    png = write(tmp_path, "r.png", encode(Image.fromarray(upright), "PNG"))
    assert load_image(png, draft_size=200).size == (1000, 1400)


# --------------------------------------------------------------------------------------------------
# Metadata and thumbnails


def test_metadata_from_exif(tmp_path: Path) -> None:
    exif = exif_bytes(
        orientation=8,
        make="Canon\x00",
        model=" EOS R5 ",
        original="2021:06:01 12:34:56",
        offset="+02:00",
        subsec="25",
        datetime_ifd0="2023:01:01 00:00:00",
    )
    data = encode(Image.new("RGB", (60, 40)), "JPEG", exif=exif)
    meta = load_image_with_metadata(write(tmp_path, "m.jpg", data))[1]
    assert (meta.width, meta.height) == (40, 60)
    assert meta.captured_at == datetime(2021, 6, 1, 12, 34, 56, 250000, tzinfo=timezone(timedelta(hours=2)))
    assert (meta.camera_make, meta.camera_model, meta.format) == ("Canon", "EOS R5", "jpeg")
    with Image.open(io.BytesIO(data)) as raw:
        assert read_metadata(raw) == meta


def test_metadata_fallbacks_and_junk_dates(tmp_path: Path) -> None:
    only_ifd0 = encode(Image.new("RGB", (8, 8)), "JPEG", exif=exif_bytes(datetime_ifd0="2019:12:31 23:59:59"))
    assert load_image_with_metadata(only_ifd0)[1].captured_at == datetime(2019, 12, 31, 23, 59, 59)
    zeros = encode(Image.new("RGB", (8, 8)), "JPEG", exif=exif_bytes(original="0000:00:00 00:00:00"))
    assert load_image_with_metadata(zeros)[1].captured_at is None
    plain = load_image_with_metadata(encode(Image.new("RGB", (8, 6)), "PNG"))[1]
    assert plain == images.ImageMetadata(8, 6, None, None, None, "png")


def test_thumbnail(tmp_path: Path) -> None:
    big = Image.fromarray(photo_like(1200, 600))
    data = make_thumbnail(big)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (384, 192)
    rgba = Image.new("RGBA", (50, 100), (0, 0, 0, 0))
    with Image.open(io.BytesIO(make_thumbnail(rgba, max_side=64))) as thumb:
        assert thumb.size == (32, 64) and thumb.mode == "RGB"
        assert (np.asarray(thumb) > 245).all()  # transparent -> white, not black
    with Image.open(io.BytesIO(make_thumbnail(rgba, max_side=500, fmt="PNG"))) as thumb:
        assert thumb.size == (50, 100) and thumb.mode == "RGBA"  # never upscaled, alpha kept
    with Image.open(io.BytesIO(make_thumbnail(big, max_side=100, fmt="WEBP", quality=70))) as thumb:
        assert thumb.format == "WEBP" and max(thumb.size) == 100
