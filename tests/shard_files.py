"""Small real shards for the data tests, written by megavl's own ShardWriter: textured PNGs (so a
different crop or flip gives different pixels) and one caption each.

Test files import it as `shard_files` (tests/ is on sys.path, as for launch_helpers)."""
from __future__ import annotations

import io
import os
from typing import Callable

from PIL import Image

from megavl.data.writer import ShardWriter


def textured_png(i: int, side: int = 10) -> bytes:
    """A `side` x `side` PNG whose pixels depend on `i` and vary across the image."""
    buf = io.BytesIO()
    pixels = bytes((i * 7 + j * j * 13) % 256 for j in range(side * side * 3))
    Image.frombytes("RGB", (side, side), pixels).save(buf, "PNG")
    return buf.getvalue()


def write_textured_shards(out: str, sizes: tuple[int, ...], prefix: str,
                          caption: Callable[[int], str] = lambda i: f"sample {i} of the set",
                          first: int = 0, side: int = 10,
                          corrupt: Callable[[int], bool] = lambda i: False) -> str:
    """Shards of `sizes` samples (keys s0000.. numbered from `first`) in `out`; `corrupt(i)` samples
    get bytes that are not an image. Returns the shards' brace pattern."""
    writer = ShardWriter(str(out), prefix=prefix)
    index = first
    for size in sizes:
        writer.start_shard()
        for _ in range(size):
            image = b"not an image" if corrupt(index) else textured_png(index, side)
            writer.write(f"s{index:04d}", {"png": image, "txt": caption(index).encode()})
            index += 1
    writer.close()
    return os.path.join(str(out), f"{prefix}{{000000..{len(sizes) - 1:06d}}}.tar")
