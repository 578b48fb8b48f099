"""Labelled images for zero-shot classification: a torchvision ImageFolder tree or shards with a class field.

    ImageFolder  ROOT/<class folder>/<image>: labels are the class folders in sorted order (as
                 torchvision's ImageFolder numbers them); a class folder without an image file is a
                 DataError naming it.
    shards       webdataset tars: an image member (jpg/jpeg/png/webp) and the class index as a `cls`
                 member (the webdataset convention: ASCII digits) or as json[class_key].
Class names and prompt templates are text files, one entry a line (blank lines and lines starting
with `#` are ignored); every template holds `{}` or `{c}`, where the class name goes (the OpenAI
ImageNet templates use `{}`, CLIP_benchmark's template files `{c}`). An image that cannot be decoded is a counted skip (data/skips.py), never
an error: `LabelledImages.skips` says how many, by reason.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from megavl.data.decode_image import IMAGE_EXTS, SkipSample, open_image
from megavl.data.shards import expand_urls, iter_raw_samples, read_field
from megavl.data.skips import MISSING_CLASS, MISSING_IMAGE
from megavl.data.task_data import open_image_file
from megavl.data.transforms import eval_transform, normalize_batch
from megavl.errors import DataError

IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS) + (".bmp", ".gif", ".tif", ".tiff")


def read_lines(path: str | Path, what: str) -> list[tuple[int, str]]:
    """(line number, text) of the entries of a one-per-line file; DataError if missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    entries = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
               if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise DataError(f"{path}: no {what} in the file")
    return entries


def read_classnames(path: str | Path) -> list[str]:
    return [name for _, name in read_lines(path, "class name")]


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates (`fill_template` fills them); one without `{}` or `{c}` is a DataError naming its line."""
    templates = []
    for number, text in read_lines(path, "template"):
        if "{}" not in text and "{c}" not in text:
            raise DataError(f"{path}:{number}: template {text!r} has no {{}} (or {{c}}) for the class name")
        templates.append(text)
    return templates


def fill_template(template: str, name: str) -> str:
    return template.format(name, c=name)


def image_folder_items(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class folders in label order, [(image path, label)]) of an ImageFolder tree."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{root / name}: class folder without an image file ({', '.join(IMAGE_SUFFIXES)})")
        items.extend((str(p), label) for p in files)
    return classes, items


def _shard_label(raw: dict, class_key: str) -> int | None:
    if "cls" in raw:
        text = read_field(raw, "cls").decode("ascii", "replace").strip()
        return int(text) if text.lstrip("-").isdigit() else None
    if "json" in raw:
        try:
            value = json.loads(read_field(raw, "json")).get(class_key)
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, int) else None
    return None


@dataclass
class LabelledImages:
    """Normalised image batches with their labels, this rank's share (every `world`-th item from `rank`).

    batches() yields {"images": float (B, 3, S, S), "labels": long (B,)}; undecodable items are
    counted in `skips` and left out."""

    image_size: int
    mean: list[float]
    std: list[float]
    batch_size: int = 64
    max_pixels: int = 89_478_485
    rank: int = 0
    world: int = 1
    num_classes: int = 0
    skips: Counter = field(default_factory=Counter)

    def _batch(self, images: list[torch.Tensor], labels: list[int]) -> dict:
        return {"images": normalize_batch(torch.stack(images), self.mean, self.std),
                "labels": torch.tensor(labels, dtype=torch.long)}

    def _collect(self, decoded: Iterator[tuple[object, int]]) -> Iterator[dict]:
        transform = eval_transform(self.image_size)
        images: list[torch.Tensor] = []
        labels: list[int] = []
        for image, label in decoded:
            if isinstance(image, str):
                self.skips[image] += 1
                continue
            if not 0 <= label < self.num_classes:
                raise DataError(f"class index {label} outside the {self.num_classes} class names")
            images.append(transform(image))
            labels.append(label)
            if len(images) == self.batch_size:
                yield self._batch(images, labels)
                images, labels = [], []
        if images:
            yield self._batch(images, labels)

    def from_folder(self, items: list[tuple[str, int]]) -> Iterator[dict]:
        share = items[self.rank::self.world]
        return self._collect((open_image_file(path, self.max_pixels, 0), label) for path, label in share)

    def from_shards(self, pattern: str, class_key: str = "label") -> Iterator[dict]:
        urls = expand_urls(pattern)
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise DataError(f"{missing[0]}: shard not found ({len(missing)} of {len(urls)} missing)")

        def decoded() -> Iterator[tuple[object, int]]:
            position = 0
            for url in urls:
                for raw in iter_raw_samples(url, skips=self.skips, read_data=True):
                    position += 1
                    if (position - 1) % self.world != self.rank:
                        continue
                    ext = next((e for e in IMAGE_EXTS if e in raw), None)
                    label = _shard_label(raw, class_key)
                    if ext is None or label is None:
                        yield (MISSING_IMAGE if ext is None else MISSING_CLASS), -1
                        continue
                    try:
                        yield open_image(read_field(raw, ext), self.max_pixels, 0), label
                    except SkipSample as skip:
                        yield skip.reason, label

        return self._collect(decoded())
