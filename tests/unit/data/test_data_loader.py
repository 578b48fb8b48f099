"""Train/eval loaders on real shards in tmp_path: batch layout, equal batches per rank, exactly-once
epochs, mixture weights, resampling, missing shards, eval coverage. World-size independence of the
order: test_data_global_order.py."""
from __future__ import annotations

import io
import os
from collections import Counter

import pytest
import torch
from PIL import Image

from megavl.config import DataConfig
from megavl.data import build_eval_loader, build_train_loader
from megavl.data.writer import ShardWriter
from megavl.errors import DataError

IMAGE_SIZE = 16
MAX_LEN = 12


def png_bytes(i: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(buf, "PNG")
    return buf.getvalue()


def write_source(out: str, name: str, sizes: list[int], stats: bool = True) -> str:
    """Shards `{name}-NNNNNN.tar` with the given sample counts; returns the brace pattern."""
    writer = ShardWriter(out, samples_per_shard=10**9, prefix=f"{name}-")
    index = 0
    for shard, n in enumerate(sizes):
        writer.start_shard()
        for _ in range(n):
            writer.write(f"{name}{index:05d}", {"png": png_bytes(index),
                                                 "txt": f"{name} picture number {index}".encode()})
            index += 1
    writer.close()
    if not stats:
        os.remove(os.path.join(out, "stats.json"))
    return os.path.join(out, f"{name}-{{000000..{len(sizes) - 1:06d}}}.tar")


def make_cfg(**overrides) -> DataConfig:
    base = dict(batch_size=3, num_workers=2, shuffle_buffer=8, image_size=IMAGE_SIZE,
                max_text_len=MAX_LEN, hflip=False)
    return DataConfig(**{**base, **overrides})


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def epoch_keys(loader) -> list[str]:
    start = loader.epoch
    keys = []
    while loader.epoch == start:
        keys.extend(next(loader)["keys"])
    return keys


def test_batch_layout(tmp_path):
    pattern = write_source(str(tmp_path), "a", [10, 10])
    loader = build_train_loader(make_cfg(train_shards=[pattern]), rank=0, world_size=1,
                                mlm_prob=0.15, scl_mask_prob=0.4)
    batch = next(loader)
    loader.close()
    B, L = 3, MAX_LEN
    expected = {"images": (torch.float32, (B, 3, IMAGE_SIZE, IMAGE_SIZE)),
                "input_ids": (torch.int64, (B, L)), "attention_mask": (torch.int64, (B, L)),
                "mlm_input_ids": (torch.int64, (B, L)), "mlm_labels": (torch.int64, (B, L)),
                "scl_input_ids": (torch.int64, (B, L)), "image_ids": (torch.int64, (B,))}
    assert set(batch) == set(expected) | {"keys"}
    for name, (dtype, shape) in expected.items():
        assert batch[name].dtype == dtype and tuple(batch[name].shape) == shape, name
    assert len(batch["keys"]) == B and all(isinstance(k, str) for k in batch["keys"])
    assert (batch["input_ids"][:, 0] == 101).all()  # [CLS]
    masked = batch["mlm_labels"] != -100
    assert (batch["mlm_labels"][masked] == batch["input_ids"][masked]).all()


@pytest.mark.parametrize("with_stats", [True, False])
def test_uneven_shards_equal_batches_each_sample_once(tmp_path, with_stats):
    pattern = write_source(str(tmp_path), "a", [7, 3, 11, 5], stats=with_stats)  # 26 samples
    cfg = make_cfg(train_shards=[pattern])
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank=rank, world_size=2, mlm_prob=0.15, scl_mask_prob=0.4)
        assert loader.batches_per_epoch == 4  # 26 cut to 24 = 4 global batches of 2 ranks x 3
        per_rank.append([epoch_keys(loader), epoch_keys(loader)])
        loader.close()
    for epoch in range(2):
        keys = per_rank[0][epoch] + per_rank[1][epoch]
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch]) == 12
        assert len(set(keys)) == 24, "a sample repeated within an epoch"
    assert per_rank[0][0] != per_rank[0][1], "epochs should be reshuffled"


def test_mixture_weights_set_per_epoch_quotas(tmp_path):
    a = write_source(str(tmp_path), "a", [8, 12])
    b = write_source(str(tmp_path), "b", [20])
    cfg = make_cfg(train_shards=[a, b], train_weights=[3.0, 1.0], samples_per_epoch=40,
                   batch_size=4, num_workers=1)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    keys = epoch_keys(loader)
    loader.close()
    by_source = Counter(k[0] for k in keys)
    assert by_source == {"a": 30, "b": 10}
    assert len({k for k in keys if k[0] == "b"}) == 10  # a subset, each once
    assert len({k for k in keys if k[0] == "a"}) == 20  # all of a, 10 of them twice


def test_resampled_is_deterministic_and_follows_weights(tmp_path):
    a = write_source(str(tmp_path), "a", [6, 6])
    b = write_source(str(tmp_path), "b", [6])
    cfg = make_cfg(train_shards=[a, b], train_weights=[1.0, 0.0], resampled=True,
                   samples_per_epoch=24, num_workers=2)
    runs = []
    for _ in range(2):
        loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
        assert loader.batches_per_epoch == 8
        runs.append([k for batch in take(loader, 10) for k in batch["keys"]])
        assert loader.epoch == 1
        loader.close()
    assert runs[0] == runs[1]
    assert all(k.startswith("a") for k in runs[0])


def test_identical_images_share_image_id(tmp_path):
    writer = ShardWriter(str(tmp_path), prefix="dup-")
    for i in range(8):
        writer.write(f"k{i}", {"png": png_bytes(i % 2), "txt": f"caption {i}".encode()})
    writer.close()
    cfg = make_cfg(train_shards=[str(tmp_path / "dup-000000.tar")], batch_size=8, num_workers=0)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    batch = next(loader)
    ids = {k: int(i) for k, i in zip(batch["keys"], batch["image_ids"])}
    assert len(set(ids.values())) == 2
    assert all(ids[f"k{i}"] == ids[f"k{i % 2}"] for i in range(8))
    assert all(0 <= v < 2**63 for v in ids.values())


def test_missing_shards_fail_at_start_listing_them(tmp_path):
    pattern = write_source(str(tmp_path), "a", [4])
    cfg = make_cfg(train_shards=[pattern, str(tmp_path / "gone-{000000..000001}.tar")])
    with pytest.raises(DataError) as err:
        build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    assert "gone-000000.tar" in str(err.value) and "gone-000001.tar" in str(err.value)
    assert "2 of 3 shards are missing" in str(err.value)
    assert str(err.value).startswith("data.train_shards: ") and "\n" not in str(err.value)


def test_epoch_too_small_for_world_is_an_error(tmp_path):
    cfg = make_cfg(train_shards=[write_source(str(tmp_path), "a", [5])])
    with pytest.raises(ValueError, match="cannot give one global batch"):
        build_train_loader(cfg, rank=0, world_size=2, mlm_prob=0.15, scl_mask_prob=0.4)


def test_pipe_urls_are_read(tmp_path):
    pattern = write_source(str(tmp_path), "a", [9])
    path = pattern.replace("{000000..000000}", "000000")
    cfg = make_cfg(train_shards=[f"pipe:cat {path}"], num_workers=0, batch_size=3)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    assert sorted(epoch_keys(loader)) == [f"a{i:05d}" for i in range(9)]


def test_eval_covers_val_once_across_ranks_deterministically(tmp_path):
    pattern = write_source(str(tmp_path), "v", [5, 6])
    cfg = make_cfg(val_shards=[pattern], batch_size=4, hflip=True)
    keys = []
    for rank in range(2):
        loader = build_eval_loader(cfg, rank=rank, world_size=2)
        first, second = list(loader), list(loader)
        assert [b["keys"] for b in first] == [b["keys"] for b in second]
        for b1, b2 in zip(first, second):
            assert torch.equal(b1["images"], b2["images"])
            assert torch.equal(b1["mlm_input_ids"], b2["mlm_input_ids"])
        keys += [k for b in first for k in b["keys"]]
    assert sorted(keys) == [f"v{i:05d}" for i in range(11)]



def test_batch_normalisation_matches_per_image_reference():
    from torchvision.transforms import v2

    from megavl.data.transforms import normalize_batch
    images = torch.randint(0, 256, (4, 3, 5, 7), dtype=torch.uint8)
    cfg = DataConfig()
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)])
    want = torch.stack([reference(img) for img in images])
    torch.testing.assert_close(normalize_batch(images, cfg.mean, cfg.std), want)
