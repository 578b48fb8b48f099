"""Real collated batches match the batch contract (megavl/data/batch.py): pre-training image and
video batches, and the batches of every task (retrieval on images and videos, VQA, NLVR2)."""
import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megavl.config import DataConfig
from megavl.data import (PretrainBatch, TaskBatch, build_eval_loader, build_task_collators,
                         build_task_loader, build_tokenizer, build_train_loader)
from megavl.data.annotations import NLVR2Item, VQAItem
from megavl.data.batch import conforms
from megavl.data.writer import ShardWriter
from megavl.tasks import nlvr2, retrieval, vqa
from megavl.tools.synth_videos import encode_mp4

S, L, T, B = 16, 8, 3, 2


def make_cfg(**overrides) -> DataConfig:
    return DataConfig(**{"batch_size": B, "num_workers": 0, "shuffle_buffer": 4, "image_size": S,
                         "max_text_len": L, "num_frames": T, "hflip": False, **overrides})


def png(path, shade: int) -> str:
    Image.new("RGB", (20, 24), (shade, 255 - shade, 7 * shade % 256)).save(path)
    return str(path)


def open_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mp4_bytes(shade: int) -> bytes:
    return encode_mp4([np.full((16, 16, 3), 10 * t + shade, np.uint8) for t in range(6)], crf=0)


def test_the_checker_names_what_is_wrong():
    batch = {"images": torch.zeros(B, 3, S, S), "index": torch.zeros(B, dtype=torch.int32),
             "valid": torch.ones(B + 1, dtype=torch.bool), "extra": 1}
    problems = conforms(batch, TaskBatch, S=S)
    assert any("index: dtype" in p for p in problems)
    assert any(p.startswith("valid: shape") for p in problems)
    assert "key 'extra' is not in the contract" in problems
    assert "missing key 'keys'" in conforms(batch, PretrainBatch)


@pytest.mark.parametrize("modality", ["image", "video"])
def test_pretraining_batches_conform(tmp_path, modality):
    with ShardWriter(str(tmp_path), samples_per_shard=100) as writer:
        for i in range(4):
            media = ({"png": open_bytes(png(tmp_path / "x.png", 40 * i))} if modality == "image"
                     else {"mp4": mp4_bytes(i)})
            writer.write(f"s{i}", {**media, "txt": f"sample number {i}".encode(),
                                   "json": json.dumps({"image_id": i}).encode()})
    cfg = make_cfg(train_shards=[str(tmp_path / "000000.tar")], val_shards=[str(tmp_path / "000000.tar")])
    train = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    dims = {"B": B, "S": S, "L": L} | ({"T": T} if modality == "video" else {})
    batch = next(train)
    assert conforms(batch, PretrainBatch, **dims) == []
    assert batch["images"].ndim == (5 if modality == "video" else 4)
    evaluation = next(iter(build_eval_loader(cfg, rank=0, world_size=1)))
    assert conforms(evaluation, PretrainBatch, **dims) == []


def task_batches(items, to_fields, cfg, *, video=False, keep_batch_size=False):
    """The first batch of a training and of an evaluation TaskLoader over `items`."""
    train_collate, eval_collate = build_task_collators(cfg, build_tokenizer(""), video=video,
                                                       keep_batch_size=keep_batch_size)
    out = []
    for train, collate in ((True, train_collate), (False, eval_collate)):
        loader = build_task_loader(items, to_fields, collate, cfg, rank=0, world=1, seed=0,
                                   train=train, video=video)
        out.append(next(iter(loader)))
    return out


def test_retrieval_batches_conform(tmp_path):
    images = [png(tmp_path / f"{i}.png", 30 * i) for i in range(4)]
    items = [(path, f"caption {i}", i) for i, path in enumerate(images)]
    for batch in task_batches(items, retrieval._train_fields, make_cfg(), keep_batch_size=True):
        assert conforms(batch, TaskBatch, B=B, S=S, L=L) == []
        assert "image_index" in batch
    for batch in task_batches(images, retrieval._image_fields, make_cfg()):
        assert conforms(batch, TaskBatch, B=B, S=S) == [] and "input_ids" not in batch


def test_video_retrieval_batches_conform(tmp_path):
    videos = []
    for i in range(4):
        (tmp_path / f"{i}.mp4").write_bytes(mp4_bytes(i))
        videos.append(str(tmp_path / f"{i}.mp4"))
    items = [(path, f"clip {i}", i) for i, path in enumerate(videos)]
    for batch in task_batches(items, retrieval._train_fields, make_cfg(), video=True, keep_batch_size=True):
        assert conforms(batch, TaskBatch, B=B, S=S, L=L, T=T) == []
        assert batch["images"].shape == (B, T, 3, S, S)


def test_vqa_batches_conform(tmp_path):
    items = [VQAItem(i, f"what is {i}", ["yes", "yes", "no"], png(tmp_path / f"{i}.png", 50 * i))
             for i in range(4)]
    label_of = {"yes": 0, "no": 1, "two": 2}
    train, _ = task_batches(items, functools.partial(vqa._train_fields, label_of), make_cfg())
    assert conforms(train, TaskBatch, B=B, S=S, L=L, C=len(label_of)) == [] and "target" in train
    _, evaluation = task_batches(items, vqa._eval_fields, make_cfg())
    assert conforms(evaluation, TaskBatch, B=B, S=S, L=L) == [] and "target" not in evaluation


def test_nlvr2_batches_conform(tmp_path):
    items = [NLVR2Item(png(tmp_path / f"l{i}.png", 20 * i), png(tmp_path / f"r{i}.png", 60 * i),
                       f"sentence {i}", i % 2) for i in range(4)]
    for batch in task_batches(items, nlvr2._fields, make_cfg()):
        assert conforms(batch, TaskBatch, B=B, S=S, L=L, N=2) == []
        assert batch["images"].shape == (B, 2, 3, S, S) and "label" in batch
