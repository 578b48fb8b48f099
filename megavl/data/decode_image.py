"""Raw sample -> (PIL image, caption, image id), or the reason it must be skipped.

Skip reasons (the trainer logs them as `data/skipped/<reason>`):
  missing_image     no jpg/jpeg/png/webp member
  empty_image       zero-byte image member
  corrupt_image     PIL cannot decode the bytes (including a truncated image)
  too_many_pixels   width * height above `max_image_pixels` (decompression bomb)
  missing_caption   neither json[caption_key] nor a txt member
  empty_caption     caption is empty or whitespace
  caption_not_utf8  txt member is not valid UTF-8
  bad_json          json member does not parse to an object
  truncated_tar     a shard ended mid-archive (counted once per shard read; see shards.py)
  unreadable_shard  a shard could not be opened as a tar
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass

from PIL import Image

from megavl.data.shards import RawSample, read_field

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("missing_image", "empty_image", "corrupt_image", "too_many_pixels",
                "missing_caption", "empty_caption", "caption_not_utf8", "bad_json",
                "truncated_tar", "unreadable_shard")
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


def _image_id(meta: dict, image_bytes: bytes) -> int:
    value = meta.get("image_id")
    if isinstance(value, bool) or value is None:
        return stable_id(image_bytes)
    if isinstance(value, int) and 0 <= value <= MAX_IMAGE_ID:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) <= MAX_IMAGE_ID:
        return int(value)
    return stable_id(str(value).encode())


def _caption(raw: RawSample, meta: dict, caption_key: str) -> str:
    value = meta.get(caption_key)
    if isinstance(value, str):
        return value
    if "txt" not in raw:
        raise _Skip("missing_caption")
    try:
        return read_field(raw, "txt").decode("utf-8")
    except UnicodeDecodeError:
        raise _Skip("caption_not_utf8") from None


class _Skip(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _open_image(data: bytes, max_pixels: int, draft_size: int) -> Image.Image:
    if not data:
        raise _Skip("empty_image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise _Skip("too_many_pixels") from None
        except Exception:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
            raise _Skip("corrupt_image") from None
        width, height = image.size
        if width * height > max_pixels:
            raise _Skip("too_many_pixels")
        if draft_size > 0 and image.format == "JPEG":
            # DCT-domain downscaling: decode at the smallest power-of-2 reduction that keeps both
            # sides >= draft_size (the transforms never need more), several times faster.
            image.draft("RGB", (draft_size, draft_size))
        try:
            image.load()  # decode now, so corrupt data is caught here
            return image if image.mode == "RGB" else image.convert("RGB")
        except Exception:
            raise _Skip("corrupt_image") from None


def meta_and_caption(raw: RawSample, caption_key: str) -> tuple[dict, str]:
    """The sample's json metadata ({} without one) and its stripped caption; raises _Skip
    ("bad_json", "empty_caption", ...) when either is unusable. Shared by images and videos."""
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(read_field(raw, "json"))
        except (ValueError, UnicodeDecodeError):
            raise _Skip("bad_json") from None
        if not isinstance(meta, dict):
            raise _Skip("bad_json")
    caption = _caption(raw, meta, caption_key).strip()
    if not caption:
        raise _Skip("empty_caption")
    return meta, caption


def decode_sample(raw: RawSample, *, caption_key: str, max_pixels: int,
                  draft_size: int = 0) -> Decoded | str:
    """Decode one raw sample; returns a `Decoded`, or a skip reason from SKIP_REASONS."""
    try:
        meta, caption = meta_and_caption(raw, caption_key)
        ext = next((e for e in IMAGE_EXTS if e in raw), None)
        if ext is None:
            raise _Skip("missing_image")
        data = read_field(raw, ext)
        image = _open_image(data, max_pixels, draft_size)
        return Decoded(raw["__key__"], image, caption, _image_id(meta, data))
    except _Skip as skip:
        return skip.reason
    except (OSError, EOFError):  # the shard changed or was cut after its headers were read
        return "truncated_tar"
