"""megavl-evaluate --task zeroshot: zero-shot classification of a megavl export, as CLIP_benchmark's JSON.

    megavl-evaluate --task zeroshot --weights EXPORT (--images ROOT | --shards PATTERN [--class-key K])
        --classnames FILE --templates FILE --out DIR [--dataset NAME] [--batch-size 64] [--device cpu]

EXPORT is a `megavl-export` directory (model.safetensors + config.yaml): its config gives the image
size, normalisation, tokenizer and text length. ROOT is a torchvision ImageFolder tree (one folder
per class, labels in sorted folder order: the class-name file lists the classes in that order);
PATTERN webdataset shards whose samples carry the class index (a `cls` member or json[K]). Writes
DIR/zeroshot_<dataset>.json: {"dataset", "model", "pretrained", "task": "zeroshot_classification",
"metrics": {"acc1", "acc5", "mean_per_class_recall", "per_class_recall", "num_images"}, "language",
"skipped"}. Exit code 2, one line: a missing or malformed input (file, class folder, template).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavl-evaluate --task zeroshot", description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=("zeroshot",), required=True)
    parser.add_argument("--weights", required=True, help="a megavl-export directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="ImageFolder root: ROOT/<class>/<image>")
    source.add_argument("--shards", help="webdataset shards (brace pattern) with a class field")
    parser.add_argument("--class-key", default="label", help="json key of the class index in shards (else a cls member)")
    parser.add_argument("--classnames", required=True, help="one class name a line, in label order")
    parser.add_argument("--templates", required=True, help="one prompt template a line, each with {}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dataset", default="", help="the result's dataset name (default: the folder's name)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch
    import yaml

    from megavl.config import ConfigError, config_from_saved
    from megavl.data.classification import LabelledImages, image_folder_items, read_classnames, read_templates
    from megavl.data.text import build_tokenizer
    from megavl.errors import DataError
    from megavl.models.pretrained import load_pretrained
    from megavl.tasks.zeroshot import class_embeddings, classify, clip_benchmark_result, zeroshot_metrics

    try:
        classnames, templates = read_classnames(args.classnames), read_templates(args.templates)
        if not (Path(args.weights) / "config.yaml").is_file():
            raise DataError(f"{args.weights}: not a megavl-export directory (no config.yaml)")
        data = config_from_saved(yaml.safe_load((Path(args.weights) / "config.yaml").read_text())).data
        model = load_pretrained(args.weights).eval().to(args.device)
        images = LabelledImages(image_size=model.cfg.vision.img_size, mean=data.mean, std=data.std,
                                batch_size=args.batch_size, max_pixels=data.max_image_pixels,
                                num_classes=len(classnames))
        if args.images:
            folders, items = image_folder_items(args.images)
            if len(folders) != len(classnames):
                raise DataError(f"{args.classnames}: {len(classnames)} class names for {len(folders)} class "
                                f"folders under {args.images}")
            batches = images.from_folder(items)
        else:
            batches = images.from_shards(args.shards, args.class_key)
        device = torch.device(args.device)
        classes = class_embeddings(model, build_tokenizer(data.tokenizer), classnames, templates,
                                   data.max_text_len, device)
        metrics = zeroshot_metrics(classify(model, batches, classes, device), classnames)
    except (DataError, ConfigError) as err:
        print(f"megavl-evaluate: {err}", file=sys.stderr)
        return 2
    dataset = args.dataset or Path((args.images or args.shards).rstrip("/")).name
    result = clip_benchmark_result(metrics, dataset, model="megavl", pretrained=str(args.weights))
    result["skipped"] = dict(images.skips)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"zeroshot_{dataset}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"zero-shot {dataset}: top-1 {metrics['acc1']:.4f}"
          + (f" top-5 {metrics['acc5']:.4f}" if metrics["acc5"] is not None else "")
          + f", {metrics['num_images']} images, {sum(images.skips.values())} skipped -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
