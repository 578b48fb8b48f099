"""Image transforms: ALBEF-style training augmentation and a deterministic eval resize.

Both take an RGB PIL image and return a uint8 tensor (3, S, S); `normalize_batch` then turns the
stacked batch into float32 normalised with `mean`/`std` in two in-place passes (4x less memory
traffic than normalising each image in float and stacking). Randomness comes from torch's global
generator, which the stream seeds per batch, so a resumed run sees the same crops and flips.
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


def normalize_batch(images_B3SS: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 ((x / 255) - mean) / std."""
    out = images_B3SS.to(torch.float32)
    scale = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    shift = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return out.sub_(shift).div_(scale)


def train_transform(image_size: int, crop_scale: list[float], hflip: bool, randaugment: bool,
                    ) -> Transform:
    """RandomResizedCrop(scale=crop_scale) [+ horizontal flip] [+ RandAugment] -> uint8 tensor.

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
    return v2.Compose(stages + [v2.PILToTensor()])


def eval_transform(image_size: int) -> Transform:
    """Resize to (S, S) (bicubic, as ALBEF's eval) -> uint8 tensor; no randomness."""
    return v2.Compose([v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC,
                                 antialias=True), v2.PILToTensor()])


def train_draft_size(image_size: int, crop_scale: list[float]) -> int:
    """Smallest image side that still gives the narrowest training crop >= image_size pixels."""
    return math.ceil(image_size / math.sqrt(crop_scale[0] * _MIN_ASPECT))
