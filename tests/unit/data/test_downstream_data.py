"""Downstream annotation files on disk (written by megavl-synth-downstream, then damaged),
their datasets and rank sharding."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megavl.data.annotations import load_nlvr2, load_retrieval, load_vqa, pre_caption
from megavl.data.task_data import (TaskCollator, TaskDataset, TaskLoader, eval_batches,
                                   train_batches)
from megavl.data.text import build_tokenizer
from megavl.data.transforms import eval_transform
from megavl.errors import DataError
from megavl.tasks.metrics import vqa_score

MEAN, STD = [0.5] * 3, [0.5] * 3


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    script = os.path.join(os.path.dirname(sys.executable), "megavl-synth-downstream")
    subprocess.run([script, "--out", str(out), "--seed", "3", "--num-train", "12",
                    "--num-eval", "4", "--image-size", "32"], check=True, capture_output=True)
    return str(out)


def _rewrite(path, entries):
    with open(path, "w") as f:
        json.dump(entries, f)


@pytest.mark.slow
def test_synth_is_deterministic_and_in_the_formats(synth, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "megavl-synth-downstream")
    subprocess.run([script, "--out", str(tmp_path), "--seed", "3", "--num-train", "12",
                    "--num-eval", "4", "--image-size", "32"], check=True, capture_output=True)
    for name in ("retrieval_train.json", "vqa_train.json", "nlvr2_dev.json",
                 "images/train/train_000005.png"):
        with open(os.path.join(synth, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    train = json.load(open(os.path.join(synth, "retrieval_train.json")))
    assert all(isinstance(e["caption"], str) for e in train)
    test = json.load(open(os.path.join(synth, "retrieval_test.json")))
    assert all(isinstance(e["caption"], list) and len(e["caption"]) == 3 for e in test)
    vqa = json.load(open(os.path.join(synth, "vqa_train.json")))
    assert all(len(e["answer"]) == 10 for e in vqa)
    assert {e["answer_type"] for e in vqa} == {"yes/no", "number", "other"}
    assert all("answer" not in e for e in json.load(open(os.path.join(synth, "vqa_test.json"))))
    # the variants make normalisation matter: "two" and "2" are both among the answers somewhere
    flat = [a for e in vqa for a in e["answer"]]
    assert any(a.isdigit() for a in flat) and any(a in ("one", "two", "three") for a in flat)
    nlvr = json.load(open(os.path.join(synth, "nlvr2_train.json")))
    assert {e["label"] for e in nlvr} == {"True", "False"}


def test_retrieval_both_forms_and_skips(synth, tmp_path):
    train = load_retrieval(os.path.join(synth, "retrieval_train.json"), synth)
    assert len(train.images) == 12 and len(train.texts) == 36
    assert all(len(t) == 3 for t in train.img2txt)
    assert all(train.txt2img[t] == i for i, ts in enumerate(train.img2txt) for t in ts)
    test = load_retrieval(os.path.join(synth, "retrieval_test.json"), synth)
    assert len(test.images) == 4 and len(test.texts) == 12
    entries = json.load(open(os.path.join(synth, "retrieval_test.json")))
    entries[0]["image"] = "images/nope.png"
    entries[1]["caption"] = ["...", "ok caption"]
    entries.append({"caption": "no image key"})
    _rewrite(tmp_path / "r.json", entries)
    damaged = load_retrieval(str(tmp_path / "r.json"), synth)
    assert damaged.skips == {"missing_image_file": 1, "empty_caption": 1, "bad_entry": 1}
    assert len(damaged.images) == 3 and len(damaged.texts) == 1 + 3 + 3
    assert pre_caption("A Red-circle, LEFT/of  it!") == "a red circle left of it"
    with pytest.raises(DataError):
        load_retrieval(str(tmp_path / "missing.json"), synth)


def test_vqa_and_nlvr2_skips(synth, tmp_path):
    entries = json.load(open(os.path.join(synth, "vqa_val.json")))
    n = len(entries)
    entries[0]["answer"] = []
    entries[1]["image"] = "images/gone.png"
    entries[2]["dataset"] = "vg"
    _rewrite(tmp_path / "v.json", entries)
    items, skips = load_vqa([str(tmp_path / "v.json")], {"vqa": synth}, need_answers=True)
    assert skips == {"no_answers": 1, "missing_image_file": 1, "unknown_vqa_source": 1}
    assert len(items) == n - 3
    items, skips = load_vqa([str(tmp_path / "v.json")], {"vqa": synth, "vg": synth},
                            need_answers=True)
    assert len(items) == n - 2
    test, skips = load_vqa([os.path.join(synth, "vqa_test.json")], {"vqa": synth},
                           need_answers=False)
    assert not skips and all(it.answers == [] for it in test)
    pairs = json.load(open(os.path.join(synth, "nlvr2_dev.json")))
    pairs[0]["label"] = "maybe"
    pairs[1]["images"] = pairs[1]["images"][:1]
    _rewrite(tmp_path / "n.json", pairs)
    items, skips = load_nlvr2(str(tmp_path / "n.json"), synth)
    assert skips == {"unknown_label": 1, "bad_entry": 1} and len(items) == len(pairs) - 2
    assert {it.label for it in items} <= {0, 1}


def test_sharding_covers_every_item_once_with_equal_batch_counts():
    for n, b, world in [(10, 3, 2), (7, 4, 3), (1, 2, 2), (16, 4, 2)]:
        plans = [eval_batches(n, b, r, world) for r in range(world)]
        assert len({len(p) for p in plans}) == 1
        valid = sorted(i for p in plans for batch in p for i, ok in batch if ok)
        assert valid == list(range(n))
        assert all(len(batch) == b for p in plans for batch in p)
    plans = [train_batches(23, 4, r, 2, epoch=1, seed=0) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == 2
    seen = [i for p in plans for batch in p for i in batch]
    assert len(seen) == len(set(seen)) == 16
    assert plans[0] == train_batches(23, 4, 0, 2, epoch=1, seed=0)
    assert plans[0] != train_batches(23, 4, 0, 2, epoch=2, seed=0)


def test_loader_decodes_and_counts_corrupt_images(synth, tmp_path):
    items, _ = load_nlvr2(os.path.join(synth, "nlvr2_dev.json"), synth)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG not really")
    items[0].left = str(bad)
    to_fields = lambda it: ([it.left, it.right], {"text": it.sentence, "label": it.label})
    tok = build_tokenizer("")
    for train, expect_rows in ((False, len(items)), (True, len(items) - 1)):
        loader = TaskLoader(TaskDataset(items, to_fields),
                            TaskCollator(eval_transform(32), MEAN, STD, tok, 16, train=train,
                                         image_size=32),
                            batch_size=len(items), rank=0, world=1, train=train)
        batch = next(iter(loader))
        assert batch["images"].shape == (expect_rows, 2, 3, 32, 32)
        assert batch["input_ids"].shape == (expect_rows, 16)
        assert batch["label"].dtype == torch.long
        assert loader.skip_counts() == {"corrupt_image": 1}


def test_synth_answers_score_as_humans_agree(synth):
    vqa = json.load(open(os.path.join(synth, "vqa_train.json")))
    # the canonical form is the majority: predicting it scores high on average
    yes_no = [e for e in vqa if e["answer_type"] == "yes/no"]
    mean = sum(vqa_score(max(set(e["answer"]), key=e["answer"].count), e["answer"])
               for e in yes_no) / len(yes_no)
    assert mean > 0.8


def test_training_crops_depend_on_seed_epoch_and_item_only(synth):
    """An evaluation or a resume between two steps draws from the global RNG (a DataLoader iterator
    takes a base seed from it): the crops must not move with it (a resumed VQA run's step-3 loss
    differed by 2.5e-5 relative when they did)."""
    from megavl.data.transforms import train_transform

    items, _ = load_nlvr2(os.path.join(synth, "nlvr2_dev.json"), synth)
    to_fields = lambda it: ([it.left, it.right], {"text": it.sentence, "label": it.label})
    collate = TaskCollator(train_transform(32, [0.3, 1.0], False, False), MEAN, STD, build_tokenizer(""), 16,
                           train=True, image_size=32)

    def batch(epoch, seed=0):
        dataset = TaskDataset(items, to_fields, seed=seed)
        dataset.epoch = epoch
        return collate([dataset[i] for i in range(len(items))])["images"]

    first = batch(0)
    torch.rand(7)  # what an eval loader or a resumed run's new iterator does to the global RNG
    assert torch.equal(batch(0), first)
    assert not torch.equal(batch(1), first) and not torch.equal(batch(0, seed=1), first)
