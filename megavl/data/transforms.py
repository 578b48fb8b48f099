"""Image transforms: ALBEF-style training augmentation and a deterministic eval resize.

Both take an RGB PIL image and return a float32 tensor (3, S, S), normalised with `mean`/`std`.
Randomness comes from torch's global generator, which the stream seeds per batch, so a resumed run
sees the same crops and flips.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

Transform = Callable[[Image.Image], torch.Tensor]

# RandomResizedCrop's narrowest aspect ratio (3/4): a crop of area fraction `scale` can be as thin
# as sqrt(scale * 3/4) of the image side.
_MIN_ASPECT = 3 / 4


def _to_normalised_tensor(mean: list[float], std: list[float]) -> list:
    return [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def train_transform(image_size: int, crop_scale: list[float], hflip: bool, randaugment: bool,
                    mean: list[float], std: list[float]) -> Transform:
    """RandomResizedCrop(scale=crop_scale) [+ horizontal flip] [+ RandAugment] + normalise.

    Note: a flip contradicts captions that say "left"/"right" (the synthetic shapes set): turn
    `hflip` off for such data.
    """
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"train_crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {crop_scale}")
    stages: list = [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale),
                                         interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if hflip:
        stages.append(v2.RandomHorizontalFlip())
    if randaugment:
        stages.append(v2.RandAugment(num_ops=2, magnitude=7))  # ALBEF's RandomAugment(2, 7)
    return v2.Compose(stages + _to_normalised_tensor(mean, std))


def eval_transform(image_size: int, mean: list[float], std: list[float]) -> Transform:
    """Resize to (S, S) (bicubic, as ALBEF's eval) + normalise; no randomness."""
    return v2.Compose([v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC,
                                 antialias=True)] + _to_normalised_tensor(mean, std))


def train_draft_size(image_size: int, crop_scale: list[float]) -> int:
    """Smallest image side that still gives the narrowest training crop >= image_size pixels."""
    return math.ceil(image_size / math.sqrt(crop_scale[0] * _MIN_ASPECT))
