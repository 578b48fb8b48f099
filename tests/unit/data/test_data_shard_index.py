"""Member indexes, multi-caption groups and stats files on real shards in tmp_path: the reader
jumps through the index (one read per sample), falls back to the header walk without one (counted
once), ignores an index that disagrees with its tar (a counted skip naming the shard), refuses
stats that lie, and sizes come from stats, index headers or one count on rank 0."""
from __future__ import annotations

import builtins
import io
import json
import logging
import os
import shutil
from collections import Counter

import pytest
from PIL import Image

from megavl.config import DataConfig
from megavl.data import build_eval_loader, build_train_loader, size_val_shards
from megavl.data.index import dump_index, index_path
from megavl.data.reader import ShardReader
from megavl.data.shards import iter_raw_samples, on_rank0, scan_groups, shard_sizes
from megavl.data.stats import COUNTED_BY
from megavl.data.writer import ShardWriter
from megavl.errors import DataError
from megavl.tools import make_shards


def png_bytes(i: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, 13)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(out, sizes: list[int], prefix: str = "s-") -> list[str]:
    """Plain one-caption shards of the given sizes; returns their paths."""
    writer = ShardWriter(str(out), samples_per_shard=10**9, prefix=prefix)
    index = 0
    for n in sizes:
        writer.start_shard()
        for _ in range(n):
            writer.write(f"k{index:04d}", {"png": png_bytes(index), "txt": f"caption {index}".encode()})
            index += 1
    writer.close()
    return [str(out / f"{prefix}{i:06d}.tar") for i in range(len(sizes))]


def read_all(reader: ShardReader, url: str, n: int) -> list[tuple]:
    return [(r["__key__"], r["__index__"], r["png"], r.get("txt")) for r in
            (reader.read(url, i) for i in range(n))]


class TarOpens:
    """Counts open() calls on .tar files while active."""

    def __init__(self):
        self.count, self._real = 0, builtins.open

    def __enter__(self) -> "TarOpens":
        def counting(file, *args, **kwargs):
            self.count += str(file).endswith(".tar")
            return self._real(file, *args, **kwargs)
        builtins.open = counting
        return self

    def __exit__(self, *exc) -> None:
        builtins.open = self._real


def test_reader_uses_the_index_one_read_per_sample(tmp_path):
    (url,) = write_shards(tmp_path, [40])
    assert os.path.isfile(index_path(url))
    skips: Counter = Counter()
    indexed = ShardReader(skips, sizes={url: 40})
    order = [37, 3, 21, 39, 0]
    samples = [indexed.read(url, i) for i in order]
    assert [s["__key__"] for s in samples] == [f"k{i:04d}" for i in order]
    assert samples[0]["txt"] == b"caption 37" and samples[0]["png"] == png_bytes(37)
    # the tar and its index opened once; the index header read once, then per sample one read
    # of its index record and one of its members
    assert indexed.io.opens == 2 and indexed.io.reads == 1 + 2 * len(order)
    assert indexed.io.bytes < 4096 + sum(len(s["png"]) + 3 * 512 + 100 for s in samples)
    assert not skips

    os.remove(index_path(url))
    walked = ShardReader(skips, sizes={url: 40})
    assert [walked.read(url, i)["png"] for i in order] == [s["png"] for s in samples]
    # sample 37 first: the walk reads the headers of 38 samples (2 members each) before it
    assert walked.io.reads > 2 * 38
    assert skips == {"missing_index": 1}


def test_missing_index_is_counted_once_per_shard(tmp_path):
    urls = write_shards(tmp_path, [5, 5])
    indexed = [read_all(ShardReader(Counter()), u, 5) for u in urls]
    for url in urls:
        os.remove(index_path(url))
    skips: Counter = Counter()
    reader = ShardReader(skips, max_open=1)  # every switch closes and reopens a shard
    walked = [[], []]
    for i in range(5):
        for s, url in enumerate(urls):
            walked[s].append(read_all_one(reader, url, i))
    assert walked == indexed
    assert skips == {"missing_index": 2}


def read_all_one(reader: ShardReader, url: str, i: int) -> tuple:
    r = reader.read(url, i)
    return r["__key__"], r["__index__"], r["png"], r.get("txt")


def test_index_that_disagrees_with_its_tar_is_a_counted_skip(tmp_path, caplog):
    (url,) = write_shards(tmp_path / "a", [6])
    expected = read_all(ShardReader(Counter()), url, 6)

    # the tar rewritten (30 samples, another size), the old index left next to it
    (other,) = write_shards(tmp_path / "b", [30])
    stale = open(index_path(url), "rb").read()
    shutil.copy(other, url)
    open(index_path(url), "wb").write(stale)
    skips: Counter = Counter()
    with caplog.at_level(logging.WARNING, logger="megavl.data.reader"):
        assert len(read_all(ShardReader(skips), url, 30)) == 30
    assert skips == {"bad_index": 1}
    assert url in caplog.text and "tar has" in caplog.text

    # an index of the right size whose records are wrong: a member past the end of the tar, and a
    # record pointing at another group's members (the tar header there names the other key)
    (url,) = write_shards(tmp_path / "c", [6])
    tar_bytes = os.path.getsize(url)
    past_end, elsewhere = scan_groups(url), scan_groups(url)
    ext, _, size = past_end[2].members[0]
    past_end[2].members[0] = (ext, tar_bytes - 100, size + 200)
    elsewhere[4].members = elsewhere[5].members
    for groups in (past_end, elsewhere):
        open(index_path(url), "wb").write(dump_index(groups, tar_bytes))
        skips = Counter()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megavl.data.reader"):
            got = read_all(ShardReader(skips), url, 6)
        assert [g[2:] for g in got] == [e[2:] for e in expected]
        assert skips == {"bad_index": 1} and url in caplog.text

    open(index_path(url), "ab").write(b" ")  # not G records of L bytes
    skips = Counter()
    assert len(read_all(ShardReader(skips), url, 6)) == 6 and skips == {"bad_index": 1}


def test_stats_that_lie_are_a_data_error_naming_the_shard(tmp_path):
    (url,) = write_shards(tmp_path, [6])
    for lie in (5, 7):
        with pytest.raises(DataError, match=f"{url} holds 6 samples but its stats file says {lie}"):
            ShardReader(Counter(), sizes={url: lie}).read(url, 0)
    os.remove(index_path(url))
    with pytest.raises(DataError, match=f"{url} holds 6 samples but its stats file says 7"):
        read_all(ShardReader(Counter(), sizes={url: 7}), url, 7)
    with pytest.raises(DataError, match=f"{url} holds more than 5 samples"):
        read_all(ShardReader(Counter(), sizes={url: 5}), url, 5)

    # through the loader: stats.json edited to promise 8
    stats = json.loads((tmp_path / "stats.json").read_text())
    stats["shards"]["s-000000.tar"] = 8
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    cfg = DataConfig(train_shards=[url], batch_size=4, num_workers=1, shuffle_buffer=0,
                     image_size=8, max_text_len=8)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    with pytest.raises(DataError, match="s-000000.tar holds 6 samples but its stats file says 8") as err:
        next(loader), next(loader)  # no index: found when the walk reaches the shard's end
    assert "\n" not in str(err.value)  # raised in a worker, re-raised as its one line
    loader.close()


def coco_shards(tmp_path, captions_per_image=(5, 1)) -> str:
    """megavl-make-shards on a COCO captions file: image i has captions_per_image[i] captions."""
    (tmp_path / "img").mkdir()
    images, annotations = [], []
    for i, n in enumerate(captions_per_image):
        Image.new("RGB", (12, 10), (40 * i, 90, 200)).save(tmp_path / "img" / f"{i}.jpg", "JPEG")
        images.append({"id": 100 + i, "file_name": f"{i}.jpg"})
        annotations += [{"image_id": 100 + i, "caption": f"image {i} caption {j}"} for j in range(n)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    make_shards.main(["--coco-json", str(tmp_path / "captions.json"), "--image-root",
                      str(tmp_path / "img"), "--out", str(tmp_path / "out")])
    return str(tmp_path / "out" / "000000.tar")


def test_an_image_with_five_captions_is_stored_once_and_gives_five_samples(tmp_path):
    import tarfile

    url = coco_shards(tmp_path)
    with tarfile.open(url) as tf:
        assert sorted(m.name for m in tf.getmembers()) == [
            "000000000.jpg", "000000000.json", "000000001.jpg", "000000001.json", "000000001.txt"]
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["shards"] == {"000000.tar": 6}
    assert shard_sizes([url]) == [6]
    walked = [(r["__key__"], r.get("__caption__")) for r in iter_raw_samples(url)]
    assert walked == [(f"000000000#{j}", j) for j in range(5)] + [("000000001", None)]
    skips: Counter = Counter()
    by_index = [ShardReader(skips, sizes={url: 6}).read(url, i)["__key__"] for i in range(6)]
    assert by_index == [k for k, _ in walked] and not skips

    cfg = DataConfig(train_shards=[url], val_shards=[url], batch_size=6, num_workers=0,
                     shuffle_buffer=6, image_size=8, max_text_len=12)
    loader = build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)
    assert loader.batches_per_epoch == 1  # the epoch: one sample per caption
    batch = next(loader)
    loader.close()
    (evaluation,) = list(build_eval_loader(cfg, rank=0, world_size=1))
    for b in (batch, evaluation):
        assert sorted(b["keys"]) == sorted(k for k, _ in walked)
        ids = dict(zip(b["keys"], b["image_ids"].tolist()))
        assert len({ids[f"000000000#{j}"] for j in range(5)}) == 1 and len(set(ids.values())) == 2
    texts = evaluation["input_ids"]
    assert len({tuple(t.tolist()) for t in texts}) == 6  # six different captions

    os.remove(index_path(url))  # the header walk reads the caption list the same way
    assert [ShardReader(Counter()).read(url, i)["__key__"] for i in range(6)] == by_index


def test_sizes_from_index_headers_recorded_once_and_never_over_a_foreign_file(tmp_path):
    urls = write_shards(tmp_path, [3, 4])
    os.remove(tmp_path / "stats.json")
    with TarOpens() as opens:
        assert shard_sizes(urls) == [3, 4]
    assert opens.count == 0  # counted from the index headers: the tars are not opened
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["written_by"] == COUNTED_BY and stats["shards"] == {"s-000000.tar": 3, "s-000001.tar": 4}
    assert stats["bytes"] == {os.path.basename(u): os.path.getsize(u) for u in urls}

    for url in urls:  # neither stats nor index: walked once, then read from the recorded stats
        os.remove(index_path(url))
    os.remove(tmp_path / "stats.json")
    with TarOpens() as opens:
        assert shard_sizes(urls) == [3, 4] and opens.count == 2
        assert shard_sizes(urls) == [3, 4] and opens.count == 2

    foreign = {"shards": {"s-000000.tar": 3}, "total": 3}  # someone else's file, lacking a shard
    (tmp_path / "stats.json").write_text(json.dumps(foreign))
    assert shard_sizes(urls) == [3, 4]
    assert json.loads((tmp_path / "stats.json").read_text()) == foreign


def cut_inside_last_member(url: str) -> None:
    """Truncate a shard inside its last member's data: its last sample is lost."""
    import tarfile

    with tarfile.open(url) as tf:
        last = tf.getmembers()[-1]
    with open(url, "r+b") as f:
        f.truncate(last.offset_data + 1)


def test_a_truncated_shard_is_not_recorded(tmp_path):
    (url,) = write_shards(tmp_path, [4])
    os.remove(tmp_path / "stats.json")
    os.remove(index_path(url))
    cut_inside_last_member(url)
    skips: Counter = Counter()
    assert shard_sizes([url], skips) == [3] and skips == {"truncated_tar": 1}
    assert not (tmp_path / "stats.json").exists()


def test_sizes_are_computed_on_rank_0_and_shared(tmp_path):
    import torch.distributed as dist

    urls = write_shards(tmp_path, [2, 3])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        assert shard_sizes(urls, world_size=1) == [2, 3]
        assert on_rank0(lambda: {"a": [1, 2]}, world_size=1) == ({"a": [1, 2]}, True)
        def broken():
            raise DataError("broken shard")
        with pytest.raises(DataError, match="broken shard"):  # raised on every rank, none waits
            on_rank0(broken, world_size=1)
        assert on_rank0(lambda: 7, world_size=2) == (7, True)  # another world: computed here
    finally:
        dist.destroy_process_group()


def test_the_val_set_is_sized_once(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, [3, 2])
    cfg = DataConfig(val_shards=[str(tmp_path / "s-{000000..000001}.tar")], batch_size=5,
                     num_workers=0, image_size=8, max_text_len=8)
    val = size_val_shards(cfg, world_size=1)
    assert [(s.url, s.stop) for s in val.segments] == list(zip(urls, [3, 2]))

    import megavl.data.build as build

    def no_sizing(*args, **kwargs):
        raise AssertionError("the val set was sized again")
    monkeypatch.setattr(build, "shard_sizes", no_sizing)
    for _ in range(2):
        (batch,) = list(build_eval_loader(cfg, rank=0, world_size=1, val=val))
        assert len(batch["keys"]) == 5


def _sizing_rank(rank: int, store: str, urls: list[str], results) -> None:
    import torch.distributed as dist

    opened: list[str] = []
    real = builtins.open

    def recording(file, *args, **kwargs):
        opened.append(str(file))
        return real(file, *args, **kwargs)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    builtins.open = recording
    try:
        skips: Counter = Counter()
        sizes = shard_sizes(urls, skips, world_size=2)
    finally:
        builtins.open = real
        dist.destroy_process_group()
    results.put((rank, sizes, dict(skips), [os.path.basename(p) for p in opened]))


def test_two_ranks_size_the_shards_once(tmp_path):
    """Rank 0 counts (no stats, no index), rank 1 opens no shard, index or stats file and gets
    the same sizes; only rank 0 carries the skips found while counting."""
    import multiprocessing

    urls = write_shards(tmp_path, [2, 3])
    os.remove(tmp_path / "stats.json")
    for url in urls:
        os.remove(index_path(url))
    cut_inside_last_member(urls[1])  # 2 of 3 samples readable, a truncation to count
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    ranks = [context.Process(target=_sizing_rank, args=(r, str(tmp_path / "store"), urls, results))
             for r in range(2)]
    for p in ranks:
        p.start()
    got = dict((r, rest) for r, *rest in (results.get(timeout=60) for _ in ranks))
    for p in ranks:
        p.join(timeout=10)
    assert got[0][0] == got[1][0] == [2, 2]
    assert got[0][1] == {"truncated_tar": 1} and got[1][1] == {}
    assert any(name.endswith(".tar") for name in got[0][2]) and got[1][2] == []
