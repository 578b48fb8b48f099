"""The data may move, and may change on request: the saved data state names shards relative to
their source's directory, with their sample counts (data/fingerprint.py), so a copy of the shards
elsewhere resumes exactly; another shard set is refused by name, or with `data_resume="approx"`
continued at the same global sample count with a warning; a state saved with the absolute-path
digest still resumes while the shards have not moved."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import pytest
import torch

from megavl.config import DataConfig
from megavl.data import build_train_loader
from megavl.data.fingerprint import shard_names
from megavl.data.shards import expand_urls
from megavl.data.task_data import TaskDataset, TaskLoader, TaskTrainStream
from megavl.errors import DataResumeError

from shard_files import write_textured_shards

SIZES = (9, 14, 7, 12)  # 42 samples -> epochs of 40 positions (global batch 8)
GLOBAL_BATCH = 8
STOP = 12               # micro-batches of 4 before the save: 48 samples, epoch 1 position 8
AFTER = 4               # micro-batches compared after the resume
TENSORS = ("images", "input_ids", "mlm_input_ids", "mlm_labels", "scl_input_ids", "image_ids")


def write_shards(out: str, sizes: tuple[int, ...]) -> str:
    return write_textured_shards(out, sizes, "g-")


def loader_for(pattern: str, state: dict | None = None, **overrides):
    cfg = DataConfig(**{**dict(train_shards=[pattern], batch_size=4, num_workers=0, shuffle_buffer=10,
                               image_size=8, max_text_len=10, hflip=True, seed=5), **overrides})
    return build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.3, scl_mask_prob=0.4,
                              global_batch_size=GLOBAL_BATCH, epoch_start_state=state)


def take(loader, n: int) -> list[dict]:
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for step, (g, w) in enumerate(zip(got, want)):
        for name in TENSORS:
            assert torch.equal(g[name], w[name]), f"step {step}: {name} differs"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(str(tmp_path_factory.mktemp("data") / "coco"), SIZES)


@pytest.fixture(scope="module")
def reference(shards) -> list[dict]:
    """The uninterrupted run's micro-batches STOP.. STOP + AFTER."""
    return take(loader_for(shards), STOP + AFTER)[STOP:]


@pytest.fixture(scope="module")
def saved(shards) -> dict:
    """The data state after STOP micro-batches, as meta.json holds it (through JSON)."""
    loader = loader_for(shards)
    take(loader, STOP)
    return json.loads(json.dumps(loader.state_dict()))


def moved_copy(shards: str, where) -> str:
    """The shard directory copied elsewhere; the pattern of the copy."""
    target = where / "scratch" / "elsewhere"
    shutil.copytree(os.path.dirname(shards), target)
    return str(target / os.path.basename(shards))


def test_the_state_names_shards_relative_to_their_directory(shards, saved):
    assert (saved["epoch"], saved["position"]) == (1, 8)
    assert os.path.dirname(shards) not in json.dumps(saved)
    assert saved["sources"] == [{"shards": [[f"g-{i:06d}.tar", n] for i, n in enumerate(SIZES)],
                                 "weight": 0.0, "quota": sum(SIZES)}]
    assert shard_names(["/a/cc/p1/0.tar", "/a/cc/p2/0.tar"]) == ["p1/0.tar", "p2/0.tar"]
    assert shard_names(["pipe:aws s3 cp s3://bucket/cc/0001.tar -", "pipe:aws s3 cp s3://bucket/cc/0002.tar -"]) \
        == ["0001.tar", "0002.tar"]


def test_a_copy_elsewhere_resumes_exactly(shards, saved, reference, tmp_path, caplog):
    moved = moved_copy(shards, tmp_path)
    assert_same(take(loader_for(moved, saved), AFTER), reference)
    # approx on data that only moved is exact too, and says nothing
    loader = loader_for(moved)
    with caplog.at_level(logging.WARNING):
        loader.load_state_dict(saved, "approx")
    assert_same(take(loader, AFTER), reference)
    assert "--data-resume approx" not in caplog.text


def test_another_shard_set_is_refused_naming_what_changed(shards, saved, tmp_path):
    fewer = shards.replace("000003", "000002")
    with pytest.raises(DataResumeError, match=r"source 0: 1 shard\(s\) removed: g-000003\.tar; .*"
                                              r"samples_per_epoch: saved 40, now 24 \(--data-resume approx"):
        loader_for(fewer, saved)
    resized = write_shards(str(tmp_path / "resized"), (9, 10, 7, 12))
    with pytest.raises(DataResumeError, match=r"1 shard\(s\) resized: g-000001\.tar 14 -> 10 samples"):
        loader_for(resized, saved)
    more = write_shards(str(tmp_path / "more"), SIZES + (5,))
    with pytest.raises(DataResumeError, match=r"1 shard\(s\) added: g-000004\.tar"):
        loader_for(more, saved)


def test_approx_continues_changed_data_at_the_same_global_sample_count(shards, saved, caplog):
    fewer = shards.replace("000003", "000002")  # 30 samples: epochs of 24
    loader = loader_for(fewer)
    with caplog.at_level(logging.WARNING):
        loader.load_state_dict(saved, "approx")
    assert loader.samples_consumed() == {"image": 48}
    assert (loader.epoch, loader.position) == (2, 0)
    warnings = [r for r in caplog.records if "--data-resume approx" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "removed: g-000003.tar" in warnings[0].getMessage()
    assert "global sample 48" in warnings[0].getMessage()
    assert len(take(loader, 1)[0]["keys"]) == 4
    # what is not the data set still has to match
    with pytest.raises(DataResumeError, match="seed: saved 5, now 6"):
        loader_for(fewer, seed=6).load_state_dict(saved, "approx")


def legacy_state(state: dict, pattern: str) -> dict:
    """The state as written before shard names were relative: a digest of the absolute URLs."""
    parts = [(expand_urls(pattern), list(SIZES), 0.0)] + [[sum(SIZES)]]
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()
    return {**{k: v for k, v in state.items() if k != "sources"}, "order_digest": digest}


def test_a_state_saved_with_absolute_paths_still_resumes(shards, saved, reference, tmp_path):
    old = legacy_state(saved, shards)
    assert_same(take(loader_for(shards, old), AFTER), reference)
    moved = moved_copy(shards, tmp_path)
    with pytest.raises(DataResumeError, match="absolute shard paths"):
        loader_for(moved, old)
    loader = loader_for(moved)
    loader.load_state_dict(old, "approx")  # the same data: approx lands on the same position
    assert_same(take(loader, AFTER), reference)


def _task_stream(num_items: int) -> TaskTrainStream:
    dataset = TaskDataset(list(range(num_items)), lambda item: ([], {}))
    collate = lambda items: {"n": len(items), "skipped": []}  # noqa: E731
    return TaskTrainStream(TaskLoader(dataset, collate, batch_size=4, rank=0, world=1, train=True, seed=3,
                                      global_batch_size=8))


def test_fine_tuning_approx_continues_another_item_count():
    stream = _task_stream(23)  # epochs of 16
    it = iter(stream)
    for _ in range(5):
        next(it)
    state = stream.state_dict()  # 20 items: epoch 1 position 4
    with pytest.raises(DataResumeError, match="num_items: saved 23, now 31"):
        _task_stream(31).load_state_dict(state)
    resumed = _task_stream(31)  # epochs of 24
    resumed.load_state_dict(state, "approx")
    assert (resumed.epoch, resumed.batches_in_epoch) == (0, 5)
