"""Which modality (image or video) each optimizer step reads, and which modality a source holds.

A batch is one modality (the collator cannot stack a (T, 3, S, S) clip with a (3, S, S) image), and
under ZeRO-3 every rank must run the same modules in the same order, so in a mixed run the modality
is chosen per OPTIMIZER step (all micro-steps of a step alike), the same on every rank, as a pure
function of (seed, step): no communication, and a resumed run (on any world size) continues the
same sequence, like the curriculum (engine/curriculum.py).

Schedule. Steps are cut into blocks of `block` steps. Block b holds exactly
    n_b = floor((b + 1) * block * share) - floor(b * block * share)
video steps (share as an exact fraction), at the first n_b places of a permutation of the block
seeded by (seed, b). So:
  - the video steps in [0, s) are floor(b * block * share) + (those among block b's first r places),
    s = b * block + r: the share is honoured to within one step at every block boundary (not only
    on average), and each stream's position at any step is known in O(block) (a resume check);
  - inside a block the places are random (`order="shuffled"`, the default), so the modality does not
    lock onto the curriculum's period (share 1/2 placed every other step would put every video step in
    the same fusion mode of the alternating curriculum);
  - `order="contiguous"` puts the block's video steps first instead: two modality switches per block.
    Under ZeRO-3 each switch invalidates DeepSpeed's prefetch trace, like a curriculum switch (the
    README measured 1.4-1.9x per step for alternating fusion modes), so long runs may prefer it with a
    block that is not a multiple of the curriculum's period.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction

from megavl.data.plan import Source, derive_seed
from megavl.data.shards import iter_raw_samples
from megavl.data.video import ALL_SKIP_REASONS, VIDEO_EXTS

MODALITIES = ("image", "video")
# every reason the training pipeline counts: the decoders' plus a sample of the other modality
SKIP_REASONS = ALL_SKIP_REASONS + ("wrong_modality",)
MODALITY_IDS = {"image": 0, "video": 1}  # logged as data/modality
MODALITY_ORDERS = ("shuffled", "contiguous")


def source_modality(source: Source) -> str:
    """'video' when the source's first sample has a video member (VIDEO_EXTS), else 'image'.

    Read from the headers of the first non-empty shard only: a source is one dataset of one kind.
    A sample of the other kind met later in the stream is a counted skip (`wrong_modality`)."""
    for url, size in zip(source.urls, source.sizes, strict=True):  # sizes: shards.shard_sizes
        if size <= 0:
            continue
        for raw in iter_raw_samples(url, 0, 1):
            return "video" if any(ext in raw for ext in VIDEO_EXTS) else "image"
    raise ValueError(f"source {source.urls[0]}... has no readable sample to tell its modality")


def default_video_share(sources: list[Source], modalities: list[str]) -> float:
    """Share of video steps when data.video_share is not set: the video sources' part of the mixture,
    by weight when weights are given (as plan.source_quotas), else by samples."""
    if all(s.weight <= 0 for s in sources):
        parts = [float(s.size) for s in sources]
    else:
        parts = [s.weight for s in sources]
    total = sum(parts)
    return sum(p for p, m in zip(parts, modalities) if m == "video") / total


@dataclass
class ModalitySchedule:
    """Step -> modality; see the module docstring. `share` = fraction of video steps in [0, 1]."""

    share: float
    block: int
    seed: int
    order: str = "shuffled"
    _fraction: Fraction = field(init=False, repr=False, compare=False)
    _cached: tuple[int, list[bool]] = field(init=False, repr=False, compare=False, default=(-1, []))

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"video share must be in [0, 1], got {self.share}")
        if self.block < 1:
            raise ValueError(f"modality block must be >= 1 step, got {self.block}")
        if self.order not in MODALITY_ORDERS:
            raise ValueError(f"modality order must be one of {MODALITY_ORDERS}, got {self.order!r}")
        self._fraction = Fraction(self.share).limit_denominator(1_000_000)

    def _video_before_block(self, block: int) -> int:
        return int(block * self.block * self._fraction)  # floor: exact rational arithmetic

    def _block_places(self, block: int) -> list[bool]:
        """Per place of the block: is it a video step?"""
        if self._cached[0] != block:
            count = self._video_before_block(block + 1) - self._video_before_block(block)
            places = list(range(self.block))
            if self.order == "shuffled":
                random.Random(derive_seed(self.seed, "modality", block)).shuffle(places)
            video = [False] * self.block
            for place in places[:count]:
                video[place] = True
            self._cached = (block, video)
        return self._cached[1]

    def at(self, step: int) -> str:
        """Modality of optimizer step `step` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        block, place = divmod(step, self.block)
        return "video" if self._block_places(block)[place] else "image"

    def steps_before(self, step: int) -> dict[str, int]:
        """Steps of each modality among steps [0, step)."""
        block, place = divmod(step, self.block)
        video = self._video_before_block(block) + sum(self._block_places(block)[:place])
        return {"image": step - video, "video": video}

    def settings(self) -> dict:
        return {"video_share": self.share, "modality_block": self.block, "modality_order": self.order,
                "seed": self.seed}
