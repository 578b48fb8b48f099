"""Seeds of every random draw in the data pipeline and the synthetic-data tools.

Each draw (an epoch's shard order, a window's permutation, a sample's crop and masks, a clip's
frames, a modality block) gets its own generator seeded by `derive_seed(run seed, "what", where...)`:
a pure function of its arguments, so the draw is the same in every worker, on every rank and after
a resume, and two kinds of draw never share a stream.
"""
from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any tuple of ints/strings (independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
