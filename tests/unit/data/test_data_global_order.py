"""The training stream is a function of (seed, epoch, global position) only:
the concatenation over ranks of every micro-step's batches is the same global batch -- same samples,
same crops/flips, same text masks -- at world 1, 2, 4 and 0, 1, 3 workers; a run resumed on another
world size / micro-batch / workers continues exactly where the uninterrupted run would be; what fixes
the order is checked on resume; one open per shard. Ranks are simulated in one
process by building the loader with rank/world arguments."""
from __future__ import annotations

import builtins

import pytest
import torch

from megavl.config import DataConfig
from megavl.data import build_train_loader
from megavl.data.order import EpochOrder
from megavl.data.sources import Segment

from shard_files import write_textured_shards

GLOBAL_BATCH = 8      # optimizer-step global batch: kept when the world changes
SIZES = (9, 14, 7, 12)  # 42 samples -> epochs of 40 positions
TENSORS = ("images", "input_ids", "mlm_input_ids", "mlm_labels", "scl_input_ids", "image_ids")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_textured_shards(tmp_path_factory.mktemp("global"), SIZES, "g-",
                                 caption=lambda i: f"sample number {i} of the set")


def make_cfg(pattern: str, **overrides) -> DataConfig:
    base = dict(train_shards=[pattern], batch_size=2, num_workers=0, shuffle_buffer=10,
                image_size=8, max_text_len=10, hflip=True, seed=5)
    return DataConfig(**{**base, **overrides})


def global_batches(pattern: str, world: int, workers: int, steps: int, state: dict | None = None,
                   **overrides) -> tuple[list[dict], list[dict]]:
    """`steps` micro-steps of a world of `world` ranks (micro-batch GLOBAL_BATCH / world / 2, so
    grad_accum = 2): per step the concatenation of the ranks' batches, and each rank's final state."""
    cfg = make_cfg(pattern, batch_size=GLOBAL_BATCH // world // 2, num_workers=workers, **overrides)
    per_rank, states = [], []
    for rank in range(world):  # one rank after the other: at most `workers` processes at a time
        loader = build_train_loader(cfg, rank=rank, world_size=world, mlm_prob=0.3,
                                    scl_mask_prob=0.4, global_batch_size=GLOBAL_BATCH,
                                    epoch_start_state=state)
        per_rank.append([next(loader) for _ in range(steps)])
        states.append(loader.state_dict())
        loader.close()
    merged = []
    for step in range(steps):
        batches = [per_rank[r][step] for r in range(world)]
        merged.append({"keys": [k for b in batches for k in b["keys"]],
                       **{name: torch.cat([b[name] for b in batches]) for name in TENSORS}})
    return merged, states


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for step, (g, w) in enumerate(zip(got, want)):
        for name in TENSORS:
            assert torch.equal(g[name], w[name]), f"step {step}: {name} differs"


STEPS = 12  # micro-steps of 4 samples: 1.2 epochs of 40 positions


@pytest.mark.slow
def test_global_batches_identical_for_any_world_and_workers(shards):
    reference, _ = global_batches(shards, world=1, workers=0, steps=STEPS)
    # the epoch: 40 of 42 samples, each once; the next epoch is reshuffled
    first_epoch = [k for b in reference[:10] for k in b["keys"]]
    assert len(first_epoch) == 40 == len(set(first_epoch))
    assert [k for b in reference[10:] for k in b["keys"]] != first_epoch[:8]
    for world, workers in ((2, 1), (4, 3), (4, 0)):
        got, _ = global_batches(shards, world=world, workers=workers, steps=STEPS)
        assert_same(got, reference)  # images equal: crops/flips per sample, not per rank batch


@pytest.mark.slow
def test_resume_on_another_world_continues_the_uninterrupted_run(shards):
    """W=4 (micro-batch 1, 1 worker) stops at micro-step 6 (global position 24); W=2 (micro-batch 2,
    2 workers) resumes from rank 0's state and crosses the epoch boundary exactly as W=4 would."""
    reference, _ = global_batches(shards, world=4, workers=1, steps=STEPS)
    head, states = global_batches(shards, world=4, workers=1, steps=6)
    state = states[0]
    assert (state["epoch"], state["position"]) == (0, 24)
    assert all({k: v for k, v in s.items() if k != "counts"} ==
               {k: v for k, v in state.items() if k != "counts"} for s in states)
    tail, _ = global_batches(shards, world=2, workers=2, steps=STEPS - 6, state=state)
    assert_same(head + tail, reference)


def test_epoch_length_and_batches_do_not_depend_on_the_world(shards):
    for world in (1, 2, 4):
        cfg = make_cfg(shards, batch_size=GLOBAL_BATCH // world // 2)
        loaders = [build_train_loader(cfg, rank=r, world_size=world, mlm_prob=0.15,
                                      scl_mask_prob=0.4, global_batch_size=GLOBAL_BATCH)
                   for r in range(world)]
        assert {ld.plan.epoch_length for ld in loaders} == {40}  # 42 cut to a multiple of 8
        assert {ld.batches_per_epoch for ld in loaders} == {40 // (GLOBAL_BATCH // 2)}


def test_what_fixes_the_order_must_match_on_resume(shards):
    cfg = make_cfg(shards, batch_size=4)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4,
                                global_batch_size=GLOBAL_BATCH)
    next(loader), next(loader)
    state = loader.state_dict()
    loader.close()
    assert state["position"] == 8 and state["global_batch_size"] == GLOBAL_BATCH
    build = lambda c, **kw: build_train_loader(c, rank=0, world_size=kw.get("world", 1),  # noqa: E731
                                               mlm_prob=0.15, scl_mask_prob=0.4,
                                               global_batch_size=kw.get("gb", GLOBAL_BATCH),
                                               epoch_start_state=state)
    with pytest.raises(ValueError, match="seed: saved 5, now 6"):
        build(make_cfg(shards, batch_size=4, seed=6))
    with pytest.raises(ValueError, match="global_batch_size: saved 8, now 16"):
        build(make_cfg(shards, batch_size=4), gb=16)
    with pytest.raises(ValueError, match="shuffle_buffer"):
        build(make_cfg(shards, batch_size=4, shuffle_buffer=20))
    with pytest.raises(ValueError, match=r"removed: g-000003\.tar"):
        build(make_cfg(shards.replace("000003", "000002"), batch_size=4))
    resumed = build(make_cfg(shards, batch_size=1, num_workers=2), world=4)  # accepted
    assert resumed.batches_in_epoch == 2  # position 8 / (1 x 4)
    with pytest.raises(ValueError, match="depended on the world size"):
        resumed.load_state_dict({"epoch": 0, "batches_in_epoch": 3, "world_size": 1})
    with pytest.raises(ValueError, match="not a multiple of the micro-step global batch"):
        resumed.load_state_dict({**state, "position": 6})


def test_one_open_per_shard(shards, monkeypatch):
    """An epoch read in-process opens each tar once (not once per member: 2 per sample)."""
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file).endswith(".tar"):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    cfg = make_cfg(shards, batch_size=4)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4,
                                global_batch_size=GLOBAL_BATCH)
    monkeypatch.setattr(builtins, "open", counting_open)
    keys = [k for _ in range(10) for k in next(loader)["keys"]]
    monkeypatch.undo()
    loader.close()
    assert len(set(keys)) == 40
    assert sorted(opened) == sorted(set(opened)) and len(opened) == len(SIZES)


def test_windows_are_whole_segments_and_permute_within():
    segments = [Segment(f"u{i}", 0, n) for i, n in enumerate((5, 3, 6, 4))]
    order = EpochOrder(segments, shuffle_buffer=7, seed=1, epoch=0, length=18)
    assert order.window_starts == [0, 8, 18]  # 5+3 >= 7, then 6+4
    first = sorted(order.locate(p) for p in range(8))
    assert first == sorted([(f"u0", i) for i in range(5)] + [("u1", i) for i in range(3)])
    assert [order.locate(p) for p in range(8)] != [("u0", i) for i in range(5)] + [("u1", i)
                                                                                    for i in range(3)]
    plain = EpochOrder(segments, shuffle_buffer=0, seed=1, epoch=0, length=18)
    assert [plain.locate(p) for p in range(6)] == [("u0", i) for i in range(5)] + [("u1", 0)]


@pytest.mark.slow
def test_bad_samples_fill_within_the_share_good_ones_unchanged(tmp_path):
    """Corrupt samples are skipped and counted at any world; a good sample sits at the same global
    position with the same pixels at world 1 and 4; a bad slot repeats a good sample of its own
    rank share, deterministically."""
    pattern = write_textured_shards(tmp_path, (20,), "b-", caption=lambda i: f"sample {i}",
                                    corrupt=lambda i: i % 5 == 2)
    one, _ = global_batches(pattern, world=1, workers=0, steps=4)
    again, _ = global_batches(pattern, world=1, workers=0, steps=4)
    assert_same(again, one)
    four, _ = global_batches(pattern, world=4, workers=1, steps=4)
    cfg = make_cfg(pattern)
    order = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.3, scl_mask_prob=0.4,
                               global_batch_size=GLOBAL_BATCH).plan.epoch_order(0)
    truth = [f"s{order.locate(p)[1]:04d}" for p in range(16)]
    corrupt = {f"s{i:04d}" for i in range(20) if i % 5 == 2}
    for step in range(4):
        for row in range(4):
            p = step * 4 + row
            for merged, share in ((one, 4), (four, 1)):
                key = merged[step]["keys"][row]
                assert key not in corrupt
                if truth[p] not in corrupt:
                    assert key == truth[p]
                else:  # repeats a good sample of the same rank share
                    first = row // share * share
                    assert key in {truth[q] for q in range(step * 4 + first, step * 4 + first + share)
                                   if truth[q] not in corrupt} or share == 1
            if truth[p] not in corrupt:
                assert torch.equal(one[step]["images"][row], four[step]["images"][row])


def test_resampled_mode_is_world_independent_too(shards):
    """Resampled epochs are whole shards drawn with replacement by ONE epoch generator, then the
    same global order: world 1 and world 2 read the same global batches."""
    one, _ = global_batches(shards, world=1, workers=0, steps=6, resampled=True,
                            samples_per_epoch=16)
    two, _ = global_batches(shards, world=2, workers=0, steps=6, resampled=True,
                            samples_per_epoch=16)
    assert_same(two, one)
    keys = [k for b in one[:4] for k in b["keys"]]
    assert len(keys) == 16  # epochs of 16 positions (4 micro-steps of 4)
    assert [k for b in one[4:] for k in b["keys"]] != keys[:8], "epoch 1 draws again"
