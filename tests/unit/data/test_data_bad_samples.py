"""Bad samples are skipped and counted by reason, never crash the loader: corrupt, zero-byte,
missing/empty/non-UTF-8 captions, bad json, decompression bombs, truncated tars (built on disk)."""
from __future__ import annotations

import io
import json
import os

import pytest
from PIL import Image

from megavl.config import DataConfig
from megavl.data import SKIP_REASONS, build_eval_loader, build_train_loader
from megavl.data.decode_image import decode_sample
from megavl.data.shards import iter_raw_samples
from megavl.data.writer import ShardWriter


def png_bytes(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (i * 20 % 256, 50, 100)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """90 Mpx (> PIL's 89,478,485 default limit) in 11 kB: a decompression bomb."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(buf, "PNG")
    return buf.getvalue()


BAD = {
    "corrupt_image": {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg", "txt": b"corrupt"},
    "empty_image": {"png": b"", "txt": b"zero bytes"},
    "missing_caption": {"png": png_bytes(1)},
    "empty_caption": {"png": png_bytes(2), "txt": b"  \n"},
    "caption_not_utf8": {"png": png_bytes(3), "txt": b"caf\xe9 \xff\xfe"},
    "too_many_pixels": {"png": bomb_png(), "txt": b"a bomb"},
    "missing_image": {"txt": b"a caption without its image"},
    "bad_json": {"png": png_bytes(4), "json": b"{not json"},
}


def truncate(path: str, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def good(writer: ShardWriter, key: str, i: int) -> None:
    writer.write(key, {"png": png_bytes(i), "json": json.dumps({"caption": f"good {i}"}).encode()})


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> tuple[list[str], set[str]]:
    """Shard A: 12 good interleaved with the 8 bad kinds; B: cut inside its 3rd sample's image;
    C: cut on a member boundary (its end-of-archive blocks are gone). 24 readable raw samples."""
    out = str(tmp_path_factory.mktemp("bad"))
    good_keys: set[str] = set()
    writer = ShardWriter(out, prefix="bad-")
    writer.start_shard()
    bad = list(BAD.items())
    for i in range(20):
        if i % 5 in (1, 3):
            reason, fields = bad.pop(0)
            writer.write(f"a_{reason}", fields)
        else:
            good(writer, f"a_good{i}", i)
            good_keys.add(f"a_good{i}")
    for shard in "bc":
        writer.start_shard()
        for i in range(3):
            good(writer, f"{shard}_good{i}", i)
    writer.close()
    os.remove(os.path.join(out, "stats.json"))  # sizes are counted: truncated shards count less
    b_path, c_path = (os.path.join(out, f"bad-00000{i}.tar") for i in (1, 2))
    members = [m for m in iter_members(b_path)]
    truncate(b_path, members[4][0] + 40)  # inside b_good2's image data (2 members a sample)
    c_members = iter_members(c_path)
    truncate(c_path, c_members[-1][0] + c_members[-1][1])  # after the last member, no end blocks
    good_keys |= {"b_good0", "b_good1", "c_good0", "c_good1"}  # c_good2 may be cut: dropped
    return [os.path.join(out, "bad-{000000..000002}.tar")], good_keys


def iter_members(path: str) -> list[tuple[int, int]]:
    """(data offset, size rounded up to 512) of each member."""
    import tarfile
    with tarfile.open(path) as tf:
        return [(m.offset_data, (m.size + 511) // 512 * 512) for m in tf.getmembers()]


def test_every_reason_is_skipped_and_counted(bad_shards):
    patterns, good_keys = bad_shards
    cfg = DataConfig(train_shards=patterns, batch_size=4, num_workers=2, shuffle_buffer=1,
                     image_size=8, max_text_len=8, hflip=False)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    assert loader.batches_per_epoch == 6  # 24 readable raw samples / (2 workers * 4)
    keys = [k for _ in range(6) for k in next(loader)["keys"]]
    counts = loader.skip_counts()
    loader.close()
    assert set(counts) == set(SKIP_REASONS)
    # B and C were cut after their member indexes were written: each worker that reads one
    # ignores its index (once per shard), and reads it by its tar headers
    assert counts.pop("missing_index") == 0 and 2 <= counts.pop("bad_index") <= 4
    expected = ({reason: 0 for reason in SKIP_REASONS if "index" not in reason}
                | {reason: 1 for reason in BAD}
                | {"truncated_tar": 2})  # video-only reasons (data/decode_video.py) stay 0 here
    assert counts == expected
    assert set(keys) == good_keys, "bad samples reached a batch or good ones were lost"
    assert loader.repeat_count() == len(BAD)


def test_eval_drops_bad_samples(bad_shards):
    patterns, good_keys = bad_shards
    cfg = DataConfig(val_shards=patterns, batch_size=5, num_workers=2, image_size=8, max_text_len=8)
    loader = build_eval_loader(cfg, rank=0, world_size=1)
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == sorted(good_keys)
    assert loader.skip_counts()["too_many_pixels"] == 1
    assert loader.skip_counts()["truncated_tar"] == 2


def test_smaller_pixel_limit_is_respected():
    raw = {"__key__": "k", "png": png_bytes(0), "txt": b"caption"}
    assert decode_sample(raw, caption_key="caption", max_pixels=63) == "too_many_pixels"
    assert decode_sample(raw, caption_key="caption", max_pixels=64).caption == "caption"


def test_json_image_id_and_caption_key():
    raw = {"__key__": "k", "png": png_bytes(0), "txt": b"from txt",
           "json": json.dumps({"alt": "from json", "image_id": 42}).encode()}
    decoded = decode_sample(raw, caption_key="alt", max_pixels=10**6)
    assert (decoded.caption, decoded.image_id) == ("from json", 42)
    assert decode_sample(raw, caption_key="caption", max_pixels=10**6).caption == "from txt"


def test_all_bad_batch_borrows_from_the_next_batch(tmp_path):
    writer = ShardWriter(str(tmp_path), prefix="x-")
    for i in range(4):
        writer.write(f"bad{i}", {"png": b"garbage", "txt": b"x"})
    for i in range(4):
        good(writer, f"good{i}", i)
    writer.close()
    cfg = DataConfig(train_shards=[str(tmp_path / "x-000000.tar")], batch_size=4, num_workers=0,
                     shuffle_buffer=0, image_size=8, max_text_len=8, hflip=False)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    first, second = next(loader), next(loader)
    assert set(first["keys"]) <= {f"good{i}" for i in range(4)}
    assert sorted(second["keys"]) == [f"good{i}" for i in range(4)]
    assert loader.skip_counts()["corrupt_image"] == 4


def test_data_without_one_good_sample_is_a_clear_error(tmp_path):
    writer = ShardWriter(str(tmp_path), prefix="y-")
    for i in range(8):
        writer.write(f"bad{i}", {"png": b"garbage", "txt": b"x"})
    writer.close()
    cfg = DataConfig(train_shards=[str(tmp_path / "y-000000.tar")], batch_size=4, num_workers=0,
                     shuffle_buffer=1, image_size=8, max_text_len=8)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    with pytest.raises(RuntimeError, match="without one decodable sample"):
        next(loader)


def test_raw_reader_reports_truncation(bad_shards):
    from collections import Counter
    patterns, _ = bad_shards
    b_path = patterns[0].replace("{000000..000002}", "000001")
    skips: Counter = Counter()
    assert [r["__key__"] for r in iter_raw_samples(b_path, skips=skips)] == ["b_good0", "b_good1"]
    assert skips == {"truncated_tar": 1}


def test_shard_shorter_than_its_stats_is_refilled(tmp_path):
    """stats.json promises 8 samples, the cut tar holds 6: the loader still yields its 2 batches,
    the 2 missing positions filled with repeats of good samples of their batch, truncation counted."""
    writer = ShardWriter(str(tmp_path), prefix="z-")
    for i in range(8):
        good(writer, f"g{i}", i)
    writer.close()
    path = str(tmp_path / "z-000000.tar")
    truncate(path, iter_members(path)[12][0] + 10)  # inside g6's image: g0..g5 survive
    cfg = DataConfig(train_shards=[path], batch_size=4, num_workers=0, shuffle_buffer=1,
                     image_size=8, max_text_len=8)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    keys = next(loader)["keys"] + next(loader)["keys"]
    assert loader.epoch == 1
    assert set(keys) == {f"g{i}" for i in range(6)}
    assert loader.repeat_count() == 2 and loader.skip_counts()["truncated_tar"] >= 1
