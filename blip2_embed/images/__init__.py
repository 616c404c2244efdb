"""Decoding photos into RGB and preprocessing them into BLIP-2 pixel tensors.

The one path every image takes: bytes -> ``load_image`` (typed errors, pixel limit, EXIF orientation, any
mode to RGB, optional JPEG DCT-scaled decoding) -> ``resize_for_model`` (the model input before
normalisation: uint8 S x S RGB, what the catalog stores) -> ``normalise`` (a table gather).
``preprocess`` is the last two, bit-for-bit what transformers' PIL-based ``BlipImageProcessor`` computes.
``decode_model_input`` chains decode and resize exactly as the indexer's workers do.

One module per job: ``sniff`` (formats by content), ``decode`` (bytes -> RGB + EXIF metadata),
``preprocess`` (``ImageSpec``, resize, normalise), ``thumbnails``; this package re-exports their public
names. Deliberately free of torch/transformers imports so worker processes start fast.
"""

from blip2_embed.images.decode import (
    DEFAULT_MAX_PIXELS,
    ImageMetadata,
    ImageSource,
    load_image,
    load_image_with_metadata,
    read_metadata,
)
from blip2_embed.images.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    ImageSpec,
    decode_for_model,
    decode_model_input,
    draft_size_for,
    normalise,
    preprocess,
    resize_for_model,
)
from blip2_embed.images.sniff import SNIFF_BYTES, sniff_format
from blip2_embed.images.thumbnails import make_thumbnail

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "SNIFF_BYTES",
    "ImageMetadata",
    "ImageSource",
    "ImageSpec",
    "decode_for_model",
    "decode_model_input",
    "draft_size_for",
    "load_image",
    "load_image_with_metadata",
    "make_thumbnail",
    "normalise",
    "preprocess",
    "read_metadata",
    "resize_for_model",
    "sniff_format",
]
