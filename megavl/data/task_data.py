"""Map-style datasets over downstream annotations, their collation and rank-sharded batching.

Items decode image files through the shard pipeline's image path (decode_image.open_image, drafted
as build.build_task_loader says) and tokenise with the project tokenizer; video items
(VideoTaskDataset) decode T frames of a video file with decode_video.decode_frames (training: one
random frame per equal segment, drawn from a seed of (run seed, epoch, item), so a resumed run sees
the same frames; evaluation: the segment centres), and their batches carry `images` as
(B, T, 3, S, S), one crop/flip draw shared by the T frames. Batches: TaskBatch (batch.py).

A file that fails to decode (corrupt, truncated, decompression bomb) is a counted skip
(skips.TASK_SKIP_REASONS): in training the item leaves its batch; in evaluation it is scored on a
black image (every item is scored exactly once, and the VQA server needs an answer to every
question). Every batch carries `skipped` (a list of reasons) so counts survive DataLoader worker
processes; `TaskLoader.skip_counts()` sums them.

Sharding: training draws an epoch-seeded permutation, drops the tail that does not fill an
optimizer-step global batch (`global_batch_size`, a multiple of world x batch_size) and deals the
micro-step's global batch b = order positions [b * G, (b + 1) * G), G = world x batch_size, rank r
taking its rows [r * B, (r + 1) * B): the samples of each optimizer step are a function of (seed,
epoch, global position) alone, the same at any world size with the same global batch
(`TaskTrainStream` continues at a saved global position). Evaluation splits the items into contiguous per-rank ranges
padded (with `valid` False) to the same number of batches per rank, so collective calls line up
and each item is scored once.
"""
from __future__ import annotations

import logging
import math
import random
from collections import Counter
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from megavl.data.batch import TaskBatch
from megavl.data.decode_image import SkipSample, open_image  # one image-opening path for shards and files
from megavl.data.loader import _ignore_stop_signals, start_workers
from megavl.data.decode_video import DEFAULT_MAX_VIDEO_FRAMES, decode_frames
from megavl.data.fingerprint import check_data_resume
from megavl.data.seeds import derive_seed
from megavl.data.skips import (IMAGE_FILE_SKIP_REASONS, MISSING_IMAGE_FILE,  # noqa: F401 (re-exported)
                               MISSING_VIDEO_FILE, TASK_SKIP_REASONS, VIDEO_FILE_SKIP_REASONS)
from megavl.data.transforms import Transform, normalize_batch
from megavl.errors import DataResumeError

logger = logging.getLogger(__name__)

MAX_PIXELS_DEFAULT = 89_478_485  # PIL's own decompression-bomb limit


def open_image_file(path: str, max_pixels: int, draft_size: int) -> Image.Image | str:
    """RGB image, or a skip reason (IMAGE_FILE_SKIP_REASONS); `draft_size`: see open_image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return MISSING_IMAGE_FILE
    try:
        return open_image(data, max_pixels, draft_size)
    except SkipSample as skip:
        return skip.reason


def open_video_file(path: str, num_frames: int, rng: random.Random | None, max_pixels: int,
                    max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES) -> torch.Tensor | str:
    """uint8 (T, 3, H, W) sampled frames (rng: training draw, None: segment centres), or a skip
    reason (VIDEO_FILE_SKIP_REASONS)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return MISSING_VIDEO_FILE
    try:
        return decode_frames(data, num_frames, rng, max_pixels, max_video_frames)[0]
    except SkipSample as skip:
        return skip.reason


class TaskDataset(Dataset):
    """items[i] -> {"index": i, "images": [PIL...] or skip reason, **fields}; `to_fields(item)`
    gives the image paths and the task's other fields."""

    def __init__(self, items: list, to_fields: Callable[[object], tuple[list[str], dict]],
                 max_pixels: int = MAX_PIXELS_DEFAULT, draft_size: int = 0, *, seed: int = 0):
        self.items, self.to_fields = items, to_fields
        self.max_pixels, self.draft_size, self.seed = max_pixels, draft_size, seed
        self.epoch = 0  # set by TaskLoader.set_epoch: the augmentation and frame draws are per epoch

    def augment_seed(self, index: int) -> int:
        """The seed of item `index`'s training augmentation in this epoch: a function of (seed,
        epoch, index) alone, so an evaluation or a resume in between does not change the crops."""
        return derive_seed(self.seed, "task-augment", self.epoch, index)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        paths, fields = self.to_fields(self.items[index])
        images = [open_image_file(p, self.max_pixels, self.draft_size) for p in paths]
        bad = next((im for im in images if isinstance(im, str)), None)
        return {"index": index, "images": bad if bad is not None else images,
                "augment_seed": self.augment_seed(index), **fields}


class VideoTaskDataset(TaskDataset):
    """items[i] -> {"index": i, "images": [uint8 (T, 3, H, W)] or skip reason, **fields}: as
    TaskDataset, `to_fields` giving video paths (see the module docstring for the frame draw)."""

    def __init__(self, items: list, to_fields: Callable[[object], tuple[list[str], dict]],
                 num_frames: int, *, train: bool, seed: int, max_pixels: int = MAX_PIXELS_DEFAULT,
                 max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES):
        super().__init__(items, to_fields, max_pixels, seed=seed)
        self.num_frames, self.train = num_frames, train
        self.max_video_frames = max_video_frames

    def __getitem__(self, index: int) -> dict:
        paths, fields = self.to_fields(self.items[index])
        clips = []
        for slot, path in enumerate(paths):
            rng = (random.Random(derive_seed(self.seed, "task-frames", self.epoch, index, slot))
                   if self.train else None)
            clips.append(open_video_file(path, self.num_frames, rng, self.max_pixels,
                                         self.max_video_frames))
        bad = next((c for c in clips if isinstance(c, str)), None)
        return {"index": index, "images": bad if bad is not None else clips,
                "augment_seed": self.augment_seed(index), **fields}


class TaskCollator:
    """List of dataset items -> batch: images (B, n_images, 3, S, S) squeezed to (B, 3, S, S) for
    one image, `text` tokenised to input_ids/attention_mask, other fields stacked as tensors.
    With clip_frames = T > 0 the items hold clips (VideoTaskDataset): images (B, T, 3, S, S), and
    an evaluation item that failed to decode is a black clip of T frames. A training item that
    failed leaves the batch, or with keep_batch_size is replaced by a copy of a good one."""

    def __init__(self, transform: Transform, mean: list[float], std: list[float], tokenizer,
                 max_text_len: int, *, train: bool, image_size: int, clip_frames: int = 0,
                 keep_batch_size: bool = False):
        self.transform, self.mean, self.std = transform, mean, std
        self.tokenizer, self.max_text_len = tokenizer, max_text_len
        self.train, self.image_size, self.clip_frames = train, image_size, clip_frames
        self.keep_batch_size = keep_batch_size

    def _transformed(self, item: dict) -> list[torch.Tensor]:
        if "augment_seed" in item:  # seeded per item (see TaskDataset.augment_seed), not by the stream of calls
            torch.default_generator.manual_seed(item["augment_seed"])
        return [self.transform(im) for im in item["images"]]

    def __call__(self, items: list[dict]) -> TaskBatch:
        """The batch (TaskBatch, batch.py) plus `skipped`: the reasons of the items that failed
        (TaskLoader takes it out and counts it)."""
        skipped = [it["images"] for it in items if isinstance(it["images"], str)]
        if self.train:
            good = [it for it in items if not isinstance(it["images"], str)]
            # keep_batch_size: a bad item's place goes to a copy of the batch's good items in turn,
            # so every rank keeps B rows (retrieval gathers features over ranks: equal shapes);
            # a copy is a positive of its original, so the retrieval losses stay well defined.
            # When every item failed there is nothing to copy: the rows stay, as black images/clips
            # (counted in "skipped"), since a rank that dropped them would leave the others waiting.
            if not self.keep_batch_size:
                items = good
            elif good:
                items = [good[i % len(good)] if isinstance(it["images"], str) else it for i, it in enumerate(items)]
        n_images = next((len(it["images"]) for it in items if not isinstance(it["images"], str)), 1)
        blank = torch.zeros(*((self.clip_frames,) if self.clip_frames else ()), 3, self.image_size,
                            self.image_size, dtype=torch.uint8)
        with torch.random.fork_rng(devices=[]):  # the transforms draw from the global CPU generator
            pixels = torch.stack([
                torch.stack([blank] * n_images) if isinstance(it["images"], str)
                else torch.stack(self._transformed(it)) for it in items])
        images = normalize_batch(pixels.flatten(0, 1), self.mean, self.std)
        images = images.view(len(items), n_images, *images.shape[1:]) if items else images
        batch = {"images": images.squeeze(1) if n_images == 1 else images,
                 "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
                 "valid": torch.tensor([it.get("valid", True) for it in items], dtype=torch.bool),
                 "skipped": skipped}
        if items and "text" in items[0]:
            tokens = self.tokenizer([it["text"] for it in items], padding="max_length",
                                    truncation=True, max_length=self.max_text_len,
                                    return_tensors="pt")
            batch["input_ids"] = tokens["input_ids"].long()
            batch["attention_mask"] = tokens["attention_mask"].long()
        for key in items[0] if items else ():
            if key not in ("index", "images", "text", "valid", "augment_seed"):
                values = [it[key] for it in items]
                batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else (
                    torch.tensor(values) if isinstance(values[0], (int, float)) else values)
        return batch


def train_batches(num_items: int, batch_size: int, rank: int, world: int, epoch: int, seed: int,
                  global_batch_size: int = 0) -> list[list[int]]:
    """This rank's batches of one training epoch (see the module docstring); global_batch_size:
    samples per optimizer step (0 = world x batch_size), the epoch is cut to a multiple of it."""
    micro_global = batch_size * world
    global_batch = global_batch_size or micro_global
    if global_batch % micro_global:
        raise ValueError(f"global batch {global_batch} is not a multiple of {world} ranks x {batch_size}")
    if num_items < global_batch:
        raise ValueError(f"{num_items} training items cannot fill one global batch of {global_batch}")
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    steps = num_items // global_batch * global_batch // micro_global
    return [order[(b * world + rank) * batch_size:(b * world + rank + 1) * batch_size].tolist()
            for b in range(steps)]


def eval_batches(num_items: int, batch_size: int, rank: int, world: int) -> list[list[tuple[int, bool]]]:
    """This rank's (index, valid) batches: contiguous range, padded with repeats of its last item
    (valid False) so every rank has ceil(ceil(N / world) / B) batches."""
    per_rank = math.ceil(num_items / world)
    lo, hi = min(rank * per_rank, num_items), min((rank + 1) * per_rank, num_items)
    steps = math.ceil(per_rank / batch_size) if num_items else 0
    own = list(range(lo, hi))
    filler = own[-1] if own else 0
    padded = [(i, True) for i in own] + [(filler, False)] * (steps * batch_size - len(own))
    return [padded[b * batch_size:(b + 1) * batch_size] for b in range(steps)]


class _Indexed(Dataset):
    """Adds the `valid` flag of padded eval positions to the underlying item."""

    def __init__(self, dataset: TaskDataset, flat: list[tuple[int, bool]]):
        self.dataset, self.flat = dataset, flat

    def __len__(self) -> int:
        return len(self.flat)

    def __getitem__(self, position: int) -> dict:
        index, valid = self.flat[position]
        return {**self.dataset[index], "valid": valid}


class TaskLoader:
    """Iterates this rank's batches of one epoch; training batches depend only on (seed, epoch), so
    resuming at (epoch, batch) is `set_epoch(epoch)` + `start_batch`."""

    def __init__(self, dataset: TaskDataset, collator: TaskCollator, *, batch_size: int, rank: int,
                 world: int, train: bool, seed: int = 0, num_workers: int = 0,
                 global_batch_size: int = 0):
        self.dataset, self.collator = dataset, collator
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.train, self.seed, self.num_workers = train, seed, num_workers
        self.global_batch_size = global_batch_size or batch_size * world
        self.epoch, self.start_batch = 0, 0
        self.counts: Counter = Counter()

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch
        self.dataset.epoch = epoch  # video frames are drawn per epoch

    def _plan(self) -> list[list[tuple[int, bool]]]:
        if self.train:
            return [[(i, True) for i in b] for b in train_batches(
                len(self.dataset), self.batch_size, self.rank, self.world, self.epoch, self.seed,
                self.global_batch_size)]
        return eval_batches(len(self.dataset), self.batch_size, self.rank, self.world)

    def __len__(self) -> int:
        return len(self._plan())

    def __iter__(self) -> Iterator[dict]:
        plan = self._plan()[self.start_batch:]
        flat = [entry for batch in plan for entry in batch]
        # workers ignore stop signals as pre-training's do (data/loader.py says why)
        loader = DataLoader(_Indexed(self.dataset, flat), batch_size=self.batch_size, shuffle=False,
                            collate_fn=self.collator, num_workers=self.num_workers,
                            worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None)
        for batch in start_workers(loader):
            self.counts.update(batch.pop("skipped"))
            yield batch

    def skip_counts(self) -> dict[str, int]:
        return dict(self.counts)


class TaskTrainStream:
    """A training TaskLoader as an endless iterator that advances epochs itself, with a resumable
    state: (epoch, global samples consumed in the epoch) plus what fixes the order. A resume on
    another world size or micro-batch continues at the same global position (same global batch)."""

    def __init__(self, loader: TaskLoader):
        self.loader = loader
        self.epoch, self.batches_in_epoch = 0, 0

    @property
    def micro_global_batch(self) -> int:
        return self.loader.batch_size * self.loader.world

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the same at every world size)."""
        return len(self.loader.dataset) // self.loader.global_batch_size

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.loader.set_epoch(self.epoch, self.batches_in_epoch)
            for batch in self.loader:
                self.batches_in_epoch += 1
                yield batch
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def _settings(self) -> dict:
        return {"seed": self.loader.seed, "num_items": len(self.loader.dataset),
                "global_batch_size": self.loader.global_batch_size}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.batches_in_epoch * self.micro_global_batch,
                **self._settings()}

    def load_state_dict(self, state: dict, data_resume: str = "exact") -> None:
        """Continue at a saved global position; a state of the per-rank form ({"epoch", "batch",
        "world_size"}) is read as position = batch x world_size x batch_size (same micro-batch).
        `data_resume="approx"`: another number of items continues at the same global item count."""
        check_data_resume(data_resume)
        if "position" not in state:
            state = {"epoch": state["epoch"],
                     "position": state["batch"] * state["world_size"] * self.loader.batch_size}
        settings = self._settings()
        changed = [k for k, v in settings.items() if k in state and state[k] != v]
        wrong = [f"{k}: saved {state[k]!r}, now {settings[k]!r}" for k in changed]
        items_only = data_resume == "approx" and changed == ["num_items"]
        if wrong and not items_only:
            raise DataResumeError("cannot continue the training order exactly, what fixes it changed: "
                                  + "; ".join(wrong))
        epoch, position = int(state["epoch"]), int(state["position"])
        if items_only:
            gb = self.loader.global_batch_size
            consumed = epoch * (state["num_items"] // gb * gb) + position
            epoch, position = divmod(consumed, self.steps_per_epoch() * gb)
            logger.warning("--data-resume approx: %s; continuing at global item %d (epoch %d, "
                           "position %d); the order from here is not the saved run's", wrong[0],
                           consumed, epoch, position)
        if position % self.micro_global_batch:
            raise DataResumeError(f"data position {position} is not a multiple of the micro-step global "
                                  f"batch {self.micro_global_batch} (batch_size x world): keep run.global_batch_size")
        self.epoch, self.batches_in_epoch = epoch, position // self.micro_global_batch

    def skip_counts(self) -> dict[str, int]:
        """Items skipped so far on this rank, by reason: every reason a file can give, 0 if none
        (the same keys on every rank, so the counts reduce over ranks as one vector)."""
        counts = self.loader.skip_counts()
        return {reason: counts.get(reason, 0) for reason in TASK_SKIP_REASONS}
