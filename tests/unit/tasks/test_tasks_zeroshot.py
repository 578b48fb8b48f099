"""Zero-shot classification: megavl-evaluate --task zeroshot on the synthetic shapes classes.

Checked against a reference written from the definition (one image at a time, argmax over the
template-averaged class embeddings), against the OpenCLIP export of the same weights scored by
open_clip's own preprocessing and tokenizer, and on bad input.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from megavl.config import load_config, to_dict
from megavl.data.classification import LabelledImages, image_folder_items, read_classnames, read_templates
from megavl.data.text import build_tokenizer
from megavl.data.transforms import eval_transform, normalize_batch
from megavl.errors import DataError
from megavl.models.vlp import VLPModel
from megavl.tasks.zeroshot import class_embeddings, classify, zeroshot_metrics
from megavl.tools import evaluate, synth_classes

ROOT = Path(__file__).resolve().parents[3]
TEMPLATES = synth_classes.TEMPLATES_FILE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zeroshot")
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = VLPModel(cfg.model).eval()
    export = tmp / "export"
    export.mkdir()
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(export / "model.safetensors"))
    (export / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    synth_classes.write(tmp / "classes", per_class=2, seed=0, image_size=64, classes="kind", shards=True)
    return cfg, model, export, tmp / "classes"


def _reference_top1(cfg, model, data: Path) -> list[tuple[int, int]]:
    """(label, predicted) per image, one image at a time."""
    tokenizer = build_tokenizer("")
    names, templates = read_classnames(data / "classnames.txt"), read_templates(data / TEMPLATES)
    rows = []
    for name in names:
        ids = tokenizer([t.format(c=name) for t in templates], padding="max_length", truncation=True,
                        max_length=cfg.data.max_text_len, return_tensors="pt")
        emb = model.text_embedding(model.encode_text(ids["input_ids"], ids["attention_mask"]))
        rows.append(torch.nn.functional.normalize(emb.mean(0), dim=0))
    classes = torch.stack(rows)
    _, items = image_folder_items(data / "images")
    out = []
    for path, label in items:
        image = eval_transform(64)(Image.open(path).convert("RGB"))[None]
        x = normalize_batch(image, cfg.data.mean, cfg.data.std)
        out.append((label, int((model.image_embedding(model.encode_image(x)) @ classes.t()).argmax())))
    return out


@torch.no_grad()
def test_cli_writes_clip_benchmark_json_equal_to_the_reference(setup, tmp_path):
    cfg, model, export, data = setup
    code = evaluate.main(["--task", "zeroshot", "--weights", str(export), "--images", str(data / "images"),
                          "--classnames", str(data / "classnames.txt"), "--templates", str(data / TEMPLATES),
                          "--out", str(tmp_path), "--dataset", "shapes"])
    assert code == 0
    result = json.loads((tmp_path / "zeroshot_shapes.json").read_text())
    assert {k: result[k] for k in ("dataset", "model", "task", "language")} == {
        "dataset": "shapes", "model": "megavl", "task": "zeroshot_classification", "language": "en"}
    pairs = _reference_top1(cfg, model, data)
    assert result["metrics"]["acc1"] == pytest.approx(sum(l == p for l, p in pairs) / len(pairs))
    assert result["metrics"]["acc5"] is None  # 4 classes: CLIP_benchmark leaves acc5 out under 5
    assert set(result["metrics"]["per_class_recall"]) == {"circle", "cross", "square", "triangle"}
    assert result["metrics"]["num_images"] == 8 and result["skipped"] == {}


@torch.no_grad()
def test_shards_with_a_cls_member_score_as_the_folder(setup):
    cfg, model, _, data = setup
    names, templates = read_classnames(data / "classnames.txt"), read_templates(data / TEMPLATES)
    classes = class_embeddings(model, build_tokenizer(""), names, templates, cfg.data.max_text_len, torch.device("cpu"))
    make = lambda: LabelledImages(64, cfg.data.mean, cfg.data.std, batch_size=3, num_classes=len(names))
    by_folder = classify(model, make().from_folder(image_folder_items(data / "images")[1]), classes, torch.device("cpu"))
    by_shards = classify(model, make().from_shards(str(data / "test" / "0.tar")), classes,
                         torch.device("cpu"))
    assert torch.equal(by_folder, by_shards) and int(by_folder[:, 0].sum()) == 8


@torch.no_grad()
def test_open_clip_export_gives_the_same_figure(setup, tmp_path):
    """The number CLIP_benchmark computes through OpenCLIP, reproduced with open_clip's own
    preprocessing and tokenizer on the export: the same top-1 as megavl-evaluate."""
    open_clip = pytest.importorskip("open_clip", reason="the dev extra installs open_clip_torch")
    from megavl.engine.export_peers import write_peers

    cfg, model, _, data = setup
    dirs = write_peers(model.state_dict(), cfg, tmp_path)
    peer, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{dirs['open_clip']}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{dirs['open_clip']}")
    peer.eval()
    names, templates = read_classnames(data / "classnames.txt"), read_templates(data / TEMPLATES)
    classes = torch.stack([torch.nn.functional.normalize(
        peer.encode_text(tokenizer([t.format(c=n) for t in templates]), normalize=True).mean(0), dim=0) for n in names])
    _, items = image_folder_items(data / "images")
    images = torch.stack([preprocess(Image.open(p)) for p, _ in items])
    predicted = (peer.encode_image(images, normalize=True) @ classes.t()).argmax(-1).tolist()
    assert [(label, p) for (_, label), p in zip(items, predicted)] == _reference_top1(cfg, model, data)


def test_bad_input_is_a_clear_error_or_a_counted_skip(setup, tmp_path):
    cfg, model, export, data = setup
    bad_templates = tmp_path / "templates.txt"
    bad_templates.write_text("a photo of a {}.\n# a comment\na photo of a thing\n")  # {} (OpenAI) is fine too
    with pytest.raises(DataError, match=r"templates.txt:3: .* has no \{\}"):
        read_templates(bad_templates)
    (tmp_path / "images" / "circle").mkdir(parents=True)
    (tmp_path / "images" / "square").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "square" / "a.png")
    with pytest.raises(DataError, match="circle: class folder without an image"):
        image_folder_items(tmp_path / "images")
    (tmp_path / "images" / "circle" / "broken.png").write_bytes(b"not a png")
    names = tmp_path / "names.txt"
    names.write_text("circle\nsquare\n")
    common = ["--task", "zeroshot", "--weights", str(export), "--images", str(tmp_path / "images"),
              "--classnames", str(names), "--out", str(tmp_path / "out"), "--dataset", "broken"]
    assert evaluate.main(common + ["--templates", str(data / TEMPLATES)]) == 0
    result = json.loads((tmp_path / "out" / "zeroshot_broken.json").read_text())
    assert result["skipped"] == {"corrupt_image": 1} and result["metrics"]["num_images"] == 1
    assert evaluate.main(common + ["--templates", str(bad_templates)]) == 2
    names.write_text("circle\n")
    assert evaluate.main(common + ["--templates", str(data / TEMPLATES)]) == 2


def test_metrics_follow_clip_benchmark_definitions():
    counts = torch.tensor([[4, 2, 4], [2, 2, 2], [0, 0, 0], [1, 0, 1], [3, 3, 3]])
    m = zeroshot_metrics(counts, ["a", "b", "c", "d", "e"])
    assert m["acc1"] == 7 / 10 and m["acc5"] == 10 / 10
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)  # classes without images left out
    assert "c" not in m["per_class_recall"]


def test_pretraining_evaluation_reports_eval_zeroshot_top1(setup):
    """run.eval_zeroshot_* make pre-training's evaluation score the class set: the eval/zeroshot_*
    TensorBoard tags and the before -> after line, with no retrieval val shards needed."""
    from types import SimpleNamespace

    from megavl.config import ConfigError
    from megavl.tasks.pretrain_eval import pretrain_evaluation
    from megavl.tasks.task import TaskEnv

    _, model, _, data = setup
    keys = [f"run.eval_zeroshot_images={data / 'images'}", f"run.eval_zeroshot_classnames={data / 'classnames.txt'}",
            f"run.eval_zeroshot_templates={data / TEMPLATES}", "data.val_shards=[]"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", keys)
    env = TaskEnv(device=torch.device("cpu"), dtype=torch.float32, rank=0, world_size=1, saved_state={})
    evaluate, report = pretrain_evaluation(cfg, SimpleNamespace(student=model), env)
    with torch.no_grad():
        metrics = evaluate("val")
    scalars, _ = report("val", metrics, "start")
    assert set(scalars) == {"eval/zeroshot_top1", "eval/zeroshot_top5"} and metrics["zeroshot_images"] == 8
    assert "zero-shot top-1 before -> after" in report("val", metrics, "end")[1]
    with pytest.raises(ConfigError, match="run.eval_zeroshot_templates"):
        load_config(ROOT / "configs" / "tiny.yaml", keys[:2])
