"""The one image decoder: encoded bytes -> (3, H, W) uint8 RGB tensor, the same way in every stage.

torchvision's decoder (libjpeg-turbo / libpng) with ``ImageReadMode.RGB``: grayscale is expanded to 3 channels,
CMYK JPEGs are converted to RGB, and a PNG's alpha channel is dropped (not composited), exactly as PIL's
``convert("RGB")`` does. The decoder sniffs the content, so a PNG stored under ``.jpg`` decodes correctly.
"""

from __future__ import annotations

import hashlib
import warnings

import torch
from torchvision.io import ImageReadMode, decode_image

from pipeline.data.shards import IMAGE_EXTS, Sample
from pipeline.errors import KdepError

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they remain the recorded decoder here
# (same libjpeg-turbo/libpng as PIL). The message is silenced once, at import, not per call.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)


class DecodeError(KdepError):
    """An image cannot be decoded, or a sample has no image; the message names the shard and key."""


def image_bytes(sample: Sample, where: str) -> bytes:
    """The sample's encoded image; a sample with no image field is an error naming the key."""
    for ext in IMAGE_EXTS:
        if ext in sample.fields:
            return sample.fields[ext]
    fields = ", ".join(sorted(sample.fields)) or "none"
    hint = (
        " (keys must not contain dots: WebDataset splits at the first dot)"
        if any("." in f for f in sample.fields)
        else ""
    )
    raise DecodeError(f"{where}: sample {sample.key!r} has no image (fields: {fields}){hint}")


def decode_rgb(data: bytes, where: str = "image") -> torch.Tensor:
    """Encoded bytes -> (3, H, W) uint8 RGB."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise DecodeError(
            f"{where}: cannot decode image ({str(err).splitlines()[0]}); fix the shard or pass --skip-bad"
        ) from None


def image_hash(data: bytes) -> bytes:
    """16-byte blake2b of the encoded bytes: the image identity stored with every cached row."""
    return hashlib.blake2b(data, digest_size=16).digest()
