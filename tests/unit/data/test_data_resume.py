"""Exact resume: a loader restarted from `state_dict()` continues the uninterrupted stream (keys,
images, masks), with 2 workers, 2 ranks (built in one process as rank 0/1 of world 2), bad samples
in the data, stops mid-epoch and at an epoch boundary."""
from __future__ import annotations

import pytest
import torch

from megavl.config import DataConfig
from megavl.data import build_train_loader

from shard_files import write_textured_shards

TOTAL_BATCHES = 16  # per rank: 2.3 epochs of 7 batches (30 samples cut to 28 = 7 x 2 ranks x 2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Three uneven shards (9 + 14 + 7 = 30 samples); every 7th sample has corrupt image bytes."""
    return write_textured_shards(tmp_path_factory.mktemp("resume"), (9, 14, 7), "r-",
                                 caption=lambda i: f"sample {i}", corrupt=lambda i: i % 7 == 3)


def make_cfg(pattern: str, **overrides) -> DataConfig:
    base = dict(train_shards=[pattern], batch_size=2, num_workers=2, shuffle_buffer=5,
                image_size=8, max_text_len=8, hflip=True, seed=3)
    return DataConfig(**{**base, **overrides})


def build(cfg: DataConfig, rank: int, state: dict | None = None):
    return build_train_loader(cfg, rank=rank, world_size=2, mlm_prob=0.3, scl_mask_prob=0.4,
                              epoch_start_state=state)


def run(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for g, w in zip(got, want):
        for name in ("images", "input_ids", "mlm_input_ids", "mlm_labels", "scl_input_ids",
                     "image_ids"):
            assert torch.equal(g[name], w[name]), name


@pytest.mark.parametrize("stop_at", [5, 7, 10])  # mid-epoch (odd: other worker next), boundary
def test_resume_continues_exactly(shards, stop_at):
    cfg = make_cfg(shards)
    for rank in range(2):
        reference = build(cfg, rank)
        assert reference.batches_per_epoch == 7
        want = run(reference, TOTAL_BATCHES)
        reference.close()

        first = build(cfg, rank)
        got = run(first, stop_at)
        state = first.state_dict()
        counts_before = first.skip_counts()
        first.close()
        assert state["epoch"] == stop_at // 7 and state["position"] == stop_at % 7 * 4

        resumed = build(cfg, rank, state)
        got += run(resumed, TOTAL_BATCHES - stop_at)
        assert_same_batches(got, want)
        if rank == 0:  # counts carry on on rank 0 only (the trainer logs their sum over ranks)
            assert resumed.skip_counts()["corrupt_image"] >= counts_before["corrupt_image"]
        resumed.close()


def test_uninterrupted_epoch_has_no_repeats_across_ranks(shards):
    cfg = make_cfg(shards)
    keys = []
    for rank in range(2):
        loader = build(cfg, rank)
        batches = run(loader, 7)
        loader.close()
        raw = [k for b in batches for k in b["keys"]]
        keys += raw
    corrupt = {f"s{i:04d}" for i in range(30) if i % 7 == 3}
    assert not corrupt & set(keys), "a corrupt sample reached a batch"
    # 28 slots from 28 distinct raw samples; each corrupt slot is filled by a repeat instead.
    assert len(keys) == 28 and len(set(keys)) >= 28 - len(corrupt)


def test_rank0_state_resumes_every_rank(shards):
    """States differ across ranks only in skip counts, so rank 0's checkpoint serves all."""
    cfg = make_cfg(shards)
    states = []
    for rank in range(2):
        loader = build(cfg, rank)
        run(loader, 4)
        states.append({k: v for k, v in loader.state_dict().items() if k != "counts"})
        loader.close()
    assert states[0] == states[1]


def test_changed_seed_refuses_changed_workers_resume(shards):
    loader = build(make_cfg(shards, num_workers=0), 0)
    run(loader, 2)
    state = loader.state_dict()
    loader.close()
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        build(make_cfg(shards, seed=4), 0, state)
    build(make_cfg(shards, num_workers=1), 0, state).close()  # workers may change
