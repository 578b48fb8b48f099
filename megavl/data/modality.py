"""Which modality (image or video) each optimizer step reads, and which modality a source holds.

A batch is one modality (the collator cannot stack a (T, 3, S, S) clip with a (3, S, S) image), and
under ZeRO-3 every rank must run the same modules in the same order, so in a mixed run the modality
is chosen per OPTIMIZER step (all micro-steps of a step alike), the same on every rank, as a pure
function of (seed, step): no communication, and a resumed run (on any world size) continues the
same sequence, like the curriculum (tasks/curriculum.py).

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
    Under ZeRO-3 each switch invalidates DeepSpeed's prefetch trace, like a curriculum switch
    (alternating fusion modes measured 1.4-1.9x slower per step), so long runs may prefer it with a
    block that is not a multiple of the curriculum's period.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from fractions import Fraction

from megavl.data.decode_image import IMAGE_EXTS
from megavl.data.decode_video import VIDEO_EXTS
from megavl.data.seeds import derive_seed
from megavl.data.shards import iter_raw_samples
from megavl.data.sources import Source

MODALITIES = ("image", "video")
MODALITY_IDS = {"image": 0, "video": 1}  # logged as data/modality
MODALITY_ORDERS = ("shuffled", "contiguous")


MODALITY_LOOKAHEAD = 8  # samples of a source's first shard read to find one with a media member


def source_modality(source: Source) -> str:
    """'video' when the first sample of the source that has a media member has a video one
    (VIDEO_EXTS), 'image' when it has an image one (IMAGE_EXTS).

    Read from the headers of the first MODALITY_LOOKAHEAD samples of the first non-empty shard: a
    source is one dataset of one kind, and a sample of the other kind met later in the stream is a
    counted skip (`wrong_modality`). A first sample without its media (a WebVid sample whose mp4 is
    missing) is itself a counted skip later, so it must not decide the kind; none of the first few
    with media is an error naming the shard."""
    for url, size in zip(source.urls, source.sizes, strict=True):  # sizes: shards.shard_sizes
        if size <= 0:
            continue
        for raw in iter_raw_samples(url, 0, MODALITY_LOOKAHEAD):
            if any(ext in raw for ext in VIDEO_EXTS):
                return "video"
            if any(ext in raw for ext in IMAGE_EXTS):
                return "image"
        raise ValueError(f"shard {url}: none of its first {MODALITY_LOOKAHEAD} samples has an image "
                         f"({', '.join(IMAGE_EXTS)}) or video ({', '.join(VIDEO_EXTS)}) member, so "
                         f"the source's modality is unknown: fix or drop the shard")
    raise ValueError(f"source {source.urls[0]}... has no readable sample to tell its modality")


def check_clip_model(modalities: tuple[str, ...], data_num_frames: int, model_num_frames: int) -> None:
    """Refuse, before the first step, clips of data.num_frames > 1 frames for a vision tower built
    without a temporal embedding (model.vision.num_frames == 1): pretrain.clip_frames would raise
    only at the first video step, possibly long into a mixed run."""
    if "video" in modalities and data_num_frames > 1 and model_num_frames == 1:
        raise ValueError(f"model.vision.num_frames=1 builds no temporal embedding, but the train "
                         f"sources hold videos read as clips of data.num_frames={data_num_frames} "
                         f"frames: set model.vision.num_frames > 1 (SCL: 8) or data.num_frames: 1")


def default_video_share(sources: list[Source], modalities: list[str]) -> float:
    """Share of video steps when data.video_share is not set: the video sources' part of the mixture,
    by weight when weights are given (as sources.source_quotas), else by samples."""
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
        if (self._fraction == 0) != (self.share == 0) or (self._fraction == 1) != (self.share == 1):
            raise ValueError(f"video share {self.share} is within 1e-6 of {self._fraction} (the "
                             f"schedule's exact fraction), which would give one modality no steps: "
                             f"use a share in [1e-6, 1 - 1e-6], or 0 / 1")

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
