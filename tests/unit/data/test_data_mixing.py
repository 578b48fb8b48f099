"""Global batches mix: shards are interleaved across sources by quota and each window of whole
shards is permuted by a keyed bijection. The shipped recipes, planned at their real shard counts
(10,000 samples per shard), give >= 16 distinct shards per global batch and a source TV distance
<= 0.10 over 200 batches; too few shards per batch is a warning naming data.shuffle_buffer; a worker
closes the shards of windows the order has left; a run moved 2 -> 4 -> 1 ranks reads exactly what
the uninterrupted run reads (ranks simulated in one process, as test_data_global_order.py does)."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from megavl.config import DataConfig, load_config
from megavl.data import build_train_loader
from megavl.data import reader as reader_module
from megavl.data.mixing import (batch_mixing, mixture, simulate_worker, source_of_url,
                                warn_if_unmixed, window_sizes)
from megavl.data.order import EpochOrder, KeyedPermutation
from megavl.data.sources import (Segment, Source, epoch_segments, resampled_epoch_segments,
                                 source_quotas)
from megavl.data.stream import TrainPlan
from megavl.tools import data_report

from shard_files import write_textured_shards

REPO = Path(__file__).resolve().parents[3]


def test_keyed_permutation_is_a_bijection_chosen_by_the_key():
    for n in (1, 2, 3, 7, 64, 65, 1000):
        for key in (0, 1, 2**62 + 5):
            perm = KeyedPermutation(n, key)
            assert sorted(perm(i) for i in range(n)) == list(range(n))
    a, b = KeyedPermutation(1000, 1), KeyedPermutation(1000, 2)
    assert [a(i) for i in range(1000)] != [b(i) for i in range(1000)]
    assert [a(i) for i in range(1000)] == [KeyedPermutation(1000, 1)(i) for i in range(1000)]
    # no positional structure: the first 100 positions of a 100k permutation spread over the range
    big = KeyedPermutation(100_000, 9)
    assert len({big(i) // 10_000 for i in range(100)}) == 10


def _sources(counts: tuple[int, ...], size: int) -> list[Source]:
    return [Source([f"/s{j}/{i:06d}.tar" for i in range(n)], [size] * n, 0.0)
            for j, n in enumerate(counts)]


def test_every_stretch_of_shards_holds_each_source_in_proportion():
    sources = _sources((6, 8, 9, 29), 100)
    quotas = source_quotas(sources, 0)
    for epoch in range(3):
        segments = epoch_segments(sources, quotas, seed=4, epoch=epoch)
        assert sorted(s.url for s in segments) == sorted(u for s in sources for u in s.urls)
        of = {u: j for j, s in enumerate(sources) for u in s.urls}
        for k in (8, 16):
            for lo in range(len(segments) - k + 1):
                window = [of[s.url] for s in segments[lo:lo + k]]
                for j, q in enumerate(quotas):
                    assert abs(window.count(j) - k * q / sum(quotas)) < 1.5, (epoch, lo, k, j)
    # resampled mode: stride scheduling keeps the mixture in every stretch too
    drawn = resampled_epoch_segments(sources, 5200, seed=4, epoch=0)
    of = {u: j for j, s in enumerate(sources) for u in s.urls}
    for lo in range(0, len(drawn) - 16):
        window = [of[s.url] for s in drawn[lo:lo + 16]]
        assert abs(window.count(3) - 16 * 29 / 52) < 1.5


def test_windows_merge_a_short_tail_and_minus_one_is_the_whole_epoch():
    segments = [Segment(f"u{i}", 0, n) for i, n in enumerate((5, 3, 6, 2))]
    assert EpochOrder(segments, 7, seed=1, epoch=0, length=16).window_starts == [0, 8, 16]
    whole = EpochOrder(segments, -1, seed=1, epoch=0, length=16)
    assert whole.window_starts == [0, 16]
    assert sorted(whole.locate(p) for p in range(16)) == sorted(
        (f"u{i}", j) for i, n in enumerate((5, 3, 6, 2)) for j in range(n))


@pytest.mark.parametrize("recipe", ["pretrain_4m", "pretrain_14m", "tiny"])
def test_shipped_recipes_mix_at_real_shard_sizes(recipe):
    """Planned from the recipe's brace patterns, 10,000 samples per shard (tiny: its 1,024), the
    recipe's own settings: >= 16 distinct shards per global batch (all of them if the epoch has
    fewer) and a source TV distance <= 0.10 over 200 consecutive batches."""
    cfg = load_config(REPO / "configs" / f"{recipe}.yaml")
    sizes = "assume=1024" if recipe == "tiny" else "assume=10000"
    plan, global_batch, _ = data_report.recipe_plan(cfg, sizes)
    order = plan.epoch_order(0)
    mixing = batch_mixing(order, source_of_url(plan), mixture(plan), global_batch, 200)
    shards = len({s.url for s in order.segments})
    assert mixing.batches == min(200, plan.epoch_length // global_batch)
    assert mixing.shards_mean >= min(16, shards)
    assert mixing.tv_mean <= 0.10
    assert mixing.sources_mean == len(plan.sources)


def _plan(sources: list[Source], shuffle_buffer: int, batch_size: int, world: int,
          global_batch: int) -> TrainPlan:
    quotas = source_quotas(sources, 0)
    return TrainPlan(sources=sources, quotas=quotas, resampled=False, virtual_size=sum(quotas),
                     epoch_length=sum(quotas) // global_batch * global_batch,
                     shuffle_buffer=shuffle_buffer, seed=0, batch_size=batch_size, rank=0,
                     world_size=world, caption_key="caption", max_pixels=10**8, draft_size=0,
                     source_indices=list(range(len(sources))))


def test_too_few_shards_per_batch_is_a_warning_naming_the_key(caplog):
    sources = _sources((6, 8, 9, 29), 1000)
    with caplog.at_level(logging.WARNING, logger="megavl.data.mixing"):
        unmixed = warn_if_unmixed(_plan(sources, 500, 64, 8, 512), 512)
    assert unmixed.shards_mean < 4
    assert "data.shuffle_buffer" in caplog.text and "shards" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megavl.data.mixing"):
        mixed = warn_if_unmixed(_plan(sources, 32_000, 64, 8, 512), 512)
    assert mixed.shards_mean >= 16 and not caplog.text


def test_report_prints_every_figure(capsys):
    assert data_report.main(["--config", str(REPO / "configs/pretrain_4m.yaml"), "--batches", "4",
                             "--set", "data.shuffle_buffer=100000"]) == 0
    out = capsys.readouterr().out
    for line in ("513 of 513 shards assumed 10,000", "distinct shards per batch", "TV distance",
                 "shards per window min/median/max 10/10/", "open handles", "file opens per sample",
                 "bytes read per sample", "8 ranks x 8 workers = 64"):
        assert line in out, line
    with pytest.raises(SystemExit):
        data_report.main(["--config", str(REPO / "configs/tiny.yaml"), "--shard-sizes-from", "x"])


# ------------------------------------------------------------------- real shards, real loaders
GLOBAL_BATCH = 8
SOURCES = ((7, 5, 6), (9, 4), (8, 3, 6, 5))  # samples per shard, per source: 9 shards, 53 samples
TENSORS = ("images", "input_ids", "mlm_input_ids", "mlm_labels", "scl_input_ids", "image_ids")


@pytest.fixture(scope="module")
def patterns(tmp_path_factory) -> list[str]:
    out, first, found = tmp_path_factory.mktemp("mixing"), 0, []
    for s, sizes in enumerate(SOURCES):
        found.append(write_textured_shards(out / f"src{s}", sizes, "m-", first=first, side=8,
                                           caption=lambda i, s=s: f"sample {i} of source {s}"))
        first += sum(sizes)
    return found


def make_cfg(patterns: list[str], world: int, **overrides) -> DataConfig:
    base = dict(train_shards=patterns, batch_size=GLOBAL_BATCH // world // 2, num_workers=0,
                shuffle_buffer=12, image_size=8, max_text_len=10, hflip=True, seed=7)
    return DataConfig(**{**base, **overrides})


def run_world(patterns: list[str], world: int, steps: int, state: dict | None = None):
    """`steps` micro-steps of `world` ranks (grad_accum 2): the merged global rows per step and
    rank 0's final state."""
    per_rank, states = [], []
    for rank in range(world):
        loader = build_train_loader(make_cfg(patterns, world), rank=rank, world_size=world,
                                    mlm_prob=0.3, scl_mask_prob=0.4, global_batch_size=GLOBAL_BATCH,
                                    epoch_start_state=state)
        per_rank.append([next(loader) for _ in range(steps)])
        states.append(loader.state_dict())
        loader.close()
    merged = [{"keys": [k for r in range(world) for k in per_rank[r][step]["keys"]],
               **{n: torch.cat([per_rank[r][step][n] for r in range(world)]) for n in TENSORS}}
              for step in range(steps)]
    return merged, states[0]


def test_resume_2_then_4_then_1_ranks_reads_the_uninterrupted_order(patterns):
    """48-position epochs of 12 micro-steps (4 samples, 2 per optimizer step); the run stops at
    micro-step 6 on 2 ranks, at 14 (next epoch) on 4, and ends at 18 on 1: every row equals the
    uninterrupted 1-rank run."""
    reference, _ = run_world(patterns, 1, 18)
    first, state = run_world(patterns, 2, 6)
    assert (state["epoch"], state["position"]) == (0, 24)
    second, state = run_world(patterns, 4, 8, state)
    assert (state["epoch"], state["position"]) == (1, 8)
    third, _ = run_world(patterns, 1, 4, state)
    got = first + second + third
    assert [b["keys"] for b in got] == [b["keys"] for b in reference]
    for step, (g, w) in enumerate(zip(got, reference)):
        for name in TENSORS:
            assert torch.equal(g[name], w[name]), f"step {step}: {name}"
    epoch = [k for b in reference[:12] for k in b["keys"]]
    assert len(set(epoch)) == 48  # each sample once per epoch (53 cut to 48)
    # a state saved under another order algorithm (no "order": the one before) is refused
    old = {k: v for k, v in state.items() if k != "order"}
    with pytest.raises(ValueError, match="order: saved None"):
        build_train_loader(make_cfg(patterns, 1), rank=0, world_size=1, mlm_prob=0.3,
                           scl_mask_prob=0.4, global_batch_size=GLOBAL_BATCH, epoch_start_state=old)


def test_a_worker_holds_only_the_shards_of_its_windows(patterns, monkeypatch):
    """An epoch read in-process: every shard opened once, at most the shards of two windows open
    at once, and exactly what simulate_worker (the report's model) predicts."""
    live, peak, opened = set(), [0], []
    real_init, real_close = reader_module._LocalShard.__init__, reader_module._LocalShard.close

    def init(self, url, skips, *args):
        real_init(self, url, skips, *args)
        live.add(id(self)), opened.append(url)
        peak[0] = max(peak[0], len(live))

    def close(self):
        live.discard(id(self))
        real_close(self)

    monkeypatch.setattr(reader_module._LocalShard, "__init__", init)
    monkeypatch.setattr(reader_module._LocalShard, "close", close)
    loader = build_train_loader(make_cfg(patterns, 1, batch_size=4), rank=0, world_size=1,
                                mlm_prob=0.3, scl_mask_prob=0.4, global_batch_size=GLOBAL_BATCH)
    for _ in range(loader.batches_per_epoch):
        next(loader)
    order = loader.plan.epoch_order(0)
    predicted = simulate_worker(loader.plan, order, num_workers=1)
    loader.close()
    windows = window_sizes(order)
    assert windows.windows >= 3 and windows.shards[2] < len(opened)
    assert sorted(opened) == sorted(set(opened))  # one open per shard per epoch
    assert predicted.opens == len(opened) and predicted.max_open == peak[0]
    assert peak[0] <= 2 * windows.shards[2] < len(opened)
