"""megavl-synth-shapes and megavl-make-shards: deterministic output, stats.json, readable shards."""
from __future__ import annotations

import io
import json
import os
import tarfile

from PIL import Image

from megavl.data.shards import iter_raw_samples, read_field
from megavl.tools import make_shards, synth_shapes


def read_shard(path: str) -> dict[str, dict[str, bytes]]:
    return {r["__key__"]: {ext: read_field(r, ext) for ext in r if not ext.startswith("__")}
            for r in iter_raw_samples(path)}


def test_synth_shapes_is_deterministic_with_stats(tmp_path):
    args = ["--num-train", "30", "--num-val", "10", "--seed", "5", "--image-size", "32",
            "--samples-per-shard", "16"]
    synth_shapes.main(["--out", str(tmp_path / "a")] + args)
    synth_shapes.main(["--out", str(tmp_path / "b")] + args)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["stats.json", "train-000000.tar", "train-000000.tar.idx", "train-000001.tar",
                     "train-000001.tar.idx", "val-000000.tar", "val-000000.tar.idx"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    tars = ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert stats["shards"] == dict(zip(tars, [16, 14, 10])) and stats["total"] == 40
    assert stats["bytes"] == {t: os.path.getsize(tmp_path / "a" / t) for t in tars}
    synth_shapes.main(["--out", str(tmp_path / "c")] + args[:5] + ["6"] + args[6:])
    assert (tmp_path / "c" / "val-000000.tar").read_bytes() != (tmp_path / "a" / "val-000000.tar").read_bytes()


def test_synth_captions_are_discriminative_and_match_pixels(tmp_path):
    synth_shapes.main(["--out", str(tmp_path), "--num-train", "0", "--num-val", "300",
                       "--seed", "0", "--image-size", "48"])
    samples = read_shard(str(tmp_path / "val-000000.tar"))
    captions = [s["txt"].decode() for s in samples.values()]
    assert len(set(captions)) > 0.9 * len(captions)
    checked = 0
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert meta["caption"] == sample["txt"].decode()
        for shape in meta["shapes"]:
            assert shape["colour"] in sample["txt"].decode() and shape["kind"] in sample["txt"].decode()
        if len(meta["shapes"]) != 1:
            continue
        # the shape's colour dominates the named grid cell
        shape = meta["shapes"][0]
        image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
        cell = 48 // 3
        box = (shape["col"] * cell, shape["row"] * cell, (shape["col"] + 1) * cell, (shape["row"] + 1) * cell)
        target = synth_shapes.COLOURS[shape["colour"]]
        raw = image.crop(box).tobytes()
        pixels = [raw[i:i + 3] for i in range(0, len(raw), 3)]
        close = sum(all(abs(p - t) < 40 for p, t in zip(px, target)) for px in pixels)
        assert close >= 8, (meta["caption"], close)
        checked += 1
    assert checked > 50


def write_image(path, size=(40, 20), colour=(200, 10, 10), fmt="PNG") -> None:
    Image.new("RGB", size, colour).save(path, fmt)


def test_make_shards_from_tsv_skips_missing_images(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        write_image(images / f"{i}.png")
    lines = ["image\tcaption"] + [f"imgs/{i}.png\tpicture {i}" for i in range(4)] + ["imgs/none.png\tlost"]
    (tmp_path / "list.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    make_shards.main(["--tsv", str(tmp_path / "list.tsv"), "--out", str(out),
                      "--samples-per-shard", "3"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards"] == {"000000.tar": 3, "000001.tar": 1} and stats["total"] == 4
    samples = {**read_shard(str(out / "000000.tar")), **read_shard(str(out / "000001.tar"))}
    assert sorted(s["txt"].decode() for s in samples.values()) == [f"picture {i}" for i in range(4)]
    assert all(set(s) == {"png", "txt", "json"} for s in samples.values())


def test_make_shards_from_coco_json_with_resize(tmp_path):
    (tmp_path / "train2014").mkdir()
    for i in (1, 2):
        write_image(tmp_path / "train2014" / f"{i}.jpg", size=(64, 32), fmt="JPEG")
    coco = {"images": [{"id": 1, "file_name": "train2014/1.jpg"}, {"id": 2, "file_name": "train2014/2.jpg"}],
            "annotations": [{"image_id": 1, "caption": "one a"}, {"image_id": 1, "caption": "one b"},
                            {"image_id": 2, "caption": "two"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    make_shards.main(["--coco-json", str(tmp_path / "captions.json"), "--image-root", str(tmp_path),
                      "--out", str(out), "--resize-long", "16"])
    samples = read_shard(str(out / "000000.tar"))
    # image 1 stored once with both captions (two samples), image 2 in the one-caption layout
    assert sorted(samples) == ["000000000#0", "000000000#1", "000000001"]
    assert json.loads(samples["000000000#1"]["json"])["captions"] == ["one a", "one b"]
    assert "txt" not in samples["000000000#0"] and samples["000000001"]["txt"] == b"two"
    assert json.loads(samples["000000001"]["json"])["image_id"] == 2
    assert all(Image.open(io.BytesIO(s["jpg"])).size == (16, 8) for s in samples.values())
    with tarfile.open(out / "000000.tar") as tf:
        assert sum(m.name.endswith(".jpg") for m in tf.getmembers()) == 2
    assert json.loads((out / "stats.json").read_text())["total"] == 3

    # re-sharding keeps the group: still two images, three samples
    make_shards.main(["--from-wds", str(out / "000000.tar"), "--out", str(tmp_path / "again")])
    again = read_shard(str(tmp_path / "again" / "000000.tar"))
    assert sorted(again) == sorted(samples)
    assert json.loads(again["000000000#0"]["json"])["captions"] == ["one a", "one b"]


def test_make_shards_reshards_existing_webdataset(tmp_path):
    synth_shapes.main(["--out", str(tmp_path / "src"), "--num-train", "25", "--num-val", "0",
                       "--seed", "1", "--image-size", "16", "--samples-per-shard", "10"])
    out = tmp_path / "out"
    make_shards.main(["--from-wds", str(tmp_path / "src" / "train-{000000..000002}.tar"),
                      "--out", str(out), "--samples-per-shard", "20"])
    assert json.loads((out / "stats.json").read_text())["total"] == 25
    before = {k: v["txt"] for p in sorted((tmp_path / "src").glob("train-*.tar"))
              for k, v in read_shard(str(p)).items()}
    after = {k: v["txt"] for p in sorted(out.glob("*.tar")) for k, v in read_shard(str(p)).items()}
    assert after == before
    with tarfile.open(out / "000000.tar") as tf:
        assert all(m.mtime == 0 for m in tf.getmembers())


def test_make_shards_indexes_existing_shards_in_place(tmp_path):
    synth_shapes.main(["--out", str(tmp_path), "--num-train", "12", "--num-val", "0", "--seed", "1",
                       "--image-size", "16", "--samples-per-shard", "5"])
    tars = sorted(p for p in tmp_path.glob("*.tar"))
    written = {p: (tmp_path / (p.name + ".idx")).read_bytes() for p in tars}
    before = {p: p.read_bytes() for p in tars}
    for p in tars:
        os.remove(str(p) + ".idx")
    os.remove(tmp_path / "stats.json")
    make_shards.main(["--index-only", str(tmp_path / "train-{000000..000002}.tar")])
    assert {p: (tmp_path / (p.name + ".idx")).read_bytes() for p in tars} == written
    assert {p: p.read_bytes() for p in tars} == before
    assert json.loads((tmp_path / "stats.json").read_text())["shards"] == {
        "train-000000.tar": 5, "train-000001.tar": 5, "train-000002.tar": 2}
