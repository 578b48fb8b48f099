"""Decode stage, images: raw shard sample -> Decoded (RGB PIL image, caption, image id), or the
reason it is skipped (skips.py; `decode_sample` returns one of IMAGE_SAMPLE_SKIP_REASONS).

Also what every decoder shares: the caption and json metadata of a sample (`meta_and_caption`),
its image id, and the one image-opening path (`open_image`) that shard samples and the task
datasets' image files (task_data.py) both go through.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image

from megavl.data.shards import CAPTIONS_KEY, RawSample, read_field
from megavl.data.skips import (BAD_JSON, CAPTION_NOT_UTF8, CORRUPT_IMAGE, EMPTY_CAPTION, EMPTY_IMAGE,
                               MISSING_CAPTION, MISSING_IMAGE, TOO_MANY_PIXELS, TRUNCATED_TAR)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_ID = (1 << 63) - 1


@dataclass
class Decoded:
    """A sample that survived decoding."""

    key: str
    image: Image.Image  # RGB
    caption: str
    image_id: int       # 0 <= id < 2**63


def stable_id(data: bytes) -> int:
    """63-bit hash of bytes: identical images (or identical id strings) share an id."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def namespaced_id(modality: str, source: int, image_id: int) -> int:
    """The id a training sample carries: a 63-bit hash of (modality, source index, decoded id).

    Sources share no images, but their ids may collide (two synthetic sources both numbering from
    0, COCO's integers against another integer-id source): ITC's same-image targets (batch and
    queue), ITM's negative exclusion and SCL would then treat a clip and an image as one image.
    Equal ids within one source stay equal (COCO's 5 captions of an image remain positives); a pure
    function of its arguments, so a resumed run sees the same ids."""
    return stable_id(f"{modality}:{source}:{image_id}".encode())


def image_id_of(meta: dict, image_bytes: bytes) -> int:
    value = meta.get("image_id")
    if isinstance(value, bool) or value is None:
        return stable_id(image_bytes)
    if isinstance(value, int) and 0 <= value <= MAX_IMAGE_ID:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) <= MAX_IMAGE_ID:
        return int(value)
    return stable_id(str(value).encode())


def _caption(raw: RawSample, meta: dict, caption_key: str) -> str:
    if "__caption__" in raw:  # caption j of a multi-caption group (shards.py)
        captions = meta.get(CAPTIONS_KEY)
        j = raw["__caption__"]
        value = captions[j] if isinstance(captions, list) and j < len(captions) else None
        if not isinstance(value, str):
            raise SkipSample(MISSING_CAPTION)
        return value
    value = meta.get(caption_key)
    if isinstance(value, str):
        return value
    if "txt" not in raw:
        raise SkipSample(MISSING_CAPTION)
    try:
        return read_field(raw, "txt").decode("utf-8")
    except UnicodeDecodeError:
        raise SkipSample(CAPTION_NOT_UTF8) from None


class SkipSample(Exception):
    """Raised inside a decoder with the reason (a skips.py name) the sample cannot be used."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def open_image(data: bytes, max_pixels: int, draft_size: int) -> Image.Image:
    """The RGB image of encoded bytes; raises SkipSample when it cannot be used.

    `draft_size` > 0 lets a JPEG decode at a reduced scale whose sides stay >= draft_size
    (transforms.draft_size: what the smallest crop of the transform still needs); 0 decodes in full.
    """
    if not data:
        raise SkipSample(EMPTY_IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise SkipSample(TOO_MANY_PIXELS) from None
        except Exception:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
            raise SkipSample(CORRUPT_IMAGE) from None
        width, height = image.size
        if width * height > max_pixels:
            raise SkipSample(TOO_MANY_PIXELS)
        if draft_size > 0 and image.format == "JPEG":
            # DCT-domain downscaling: decode at the smallest power-of-2 reduction that keeps both
            # sides >= draft_size (the transforms never need more), several times faster.
            image.draft("RGB", (draft_size, draft_size))
        try:
            image.load()  # decode now, so corrupt data is caught here
            return image if image.mode == "RGB" else image.convert("RGB")
        except Exception:
            raise SkipSample(CORRUPT_IMAGE) from None


def meta_and_caption(raw: RawSample, caption_key: str) -> tuple[dict, str]:
    """The sample's json metadata ({} without one) and its stripped caption; raises SkipSample
    (BAD_JSON, EMPTY_CAPTION, ...) when either is unusable. Shared by images and videos."""
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(read_field(raw, "json"))
        except (ValueError, UnicodeDecodeError):
            raise SkipSample(BAD_JSON) from None
        if not isinstance(meta, dict):
            raise SkipSample(BAD_JSON)
    caption = _caption(raw, meta, caption_key).strip()
    if not caption:
        raise SkipSample(EMPTY_CAPTION)
    return meta, caption


def decode_sample(raw: RawSample, *, caption_key: str, max_pixels: int,
                  draft_size: int = 0) -> Decoded | str:
    """Decode one raw sample; returns a `Decoded`, or a skip reason (IMAGE_SAMPLE_SKIP_REASONS)."""
    try:
        meta, caption = meta_and_caption(raw, caption_key)
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise SkipSample(MISSING_IMAGE)
        data = read_field(raw, ext)
        image = open_image(data, max_pixels, draft_size)
        return Decoded(raw["__key__"], image, caption, image_id_of(meta, data))
    except SkipSample as skip:
        return skip.reason
    except (OSError, EOFError):  # the shard changed or was cut after its headers were read
        return TRUNCATED_TAR
