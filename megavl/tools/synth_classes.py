"""megavl-synth-classes: a deterministic shapes classification set for zero-shot checks on CPU.

One large shape per image, in the colours and kinds of megavl-synth-shapes (whose captions the demo
model learns), at a random grid cell. A class is a colour and a kind ("red circle": 6 x 4 = 24
classes, or `--classes kind`: the 4 kinds in random colours).

    megavl-synth-classes --out DIR --per-class N --seed S [--image-size 64] [--classes colour_kind|kind]
                         [--shards]
writes DIR/images/<class_folder>/NNNN.png (torchvision ImageFolder layout), DIR/classnames.txt (one
name a line, in the folders' sorted order) and DIR/zeroshot_classification_templates.txt; with
--shards also DIR/test/0.tar + DIR/test/nshards.txt, samples carrying the class index as a `cls`
member. With --shards, DIR is a CLIP_benchmark webdataset directory (`--dataset wds/NAME
--dataset_root DIR`) as well as megavl-evaluate's input. Same arguments, same bytes.
"""
from __future__ import annotations

import argparse
import io
import random
import sys
from pathlib import Path

from megavl.data.seeds import derive_seed
from megavl.data.writer import ShardWriter
from megavl.tools.synth_shapes import COLOURS, GRID, SHAPES, Shape, draw

# CLIP-style prompts in the demo captions' wording ("a large red circle in the center").
# `{c}`: CLIP_benchmark formats templates by that name; megavl reads `{}` and `{c}` alike.
TEMPLATES = ("a {c}.", "a photo of a {c}.", "a large {c}.", "a large {c} on a light background.")
TEMPLATES_FILE = "zeroshot_classification_templates.txt"  # CLIP_benchmark's name for it


def class_names(kind: str) -> list[str]:
    """Names in the sorted order of their folders (folder = name with spaces as underscores)."""
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES] if kind == "colour_kind" else list(SHAPES)
    return sorted(names, key=lambda n: n.replace(" ", "_"))


def write(out: str | Path, per_class: int, seed: int, image_size: int = 64, classes: str = "colour_kind",
          shards: bool = False) -> list[str]:
    out = Path(out)
    names = class_names(classes)
    rng = random.Random(derive_seed(seed, "synth-classes", classes))
    writer = ShardWriter(str(out / "test"), samples_per_shard=len(names) * per_class, prefix="") if shards else None
    for label, name in enumerate(names):
        folder = out / "images" / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour, kind = name.split() if classes == "colour_kind" else (rng.choice(list(COLOURS)), name)
            cell = rng.randrange(GRID * GRID)
            buf = io.BytesIO()
            draw([Shape(kind, colour, "large", cell // GRID, cell % GRID)], image_size, rng).save(buf, format="PNG")
            (folder / f"{i:04d}.png").write_bytes(buf.getvalue())
            if writer is not None:
                writer.write(f"{label:03d}{i:05d}", {"png": buf.getvalue(), "cls": str(label).encode()})
    if writer is not None:
        writer.close()
        # CLIP_benchmark reads test/{0..n-1}.tar and their count from test/nshards.txt
        for suffix in (".tar", ".tar.idx"):
            (out / "test" / f"000000{suffix}").rename(out / "test" / f"0{suffix}")
        (out / "test" / "nshards.txt").write_text("1\n")
        (out / "test" / "stats.json").unlink()  # named the shard before its rename; nothing reads it here
    (out / "classnames.txt").write_text("\n".join(names) + "\n")
    (out / TEMPLATES_FILE).write_text("\n".join(TEMPLATES) + "\n")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavl-synth-classes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-class", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", choices=("colour_kind", "kind"), default="colour_kind")
    parser.add_argument("--shards", action="store_true", help="also write webdataset shards with a cls member")
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.image_size < 8:
        parser.error("--per-class must be >= 1 and --image-size >= 8")
    names = write(args.out, args.per_class, args.seed, args.image_size, args.classes, args.shards)
    print(f"{len(names)} classes x {args.per_class} images under {Path(args.out) / 'images'}; "
          f"class names {Path(args.out) / 'classnames.txt'}, templates {Path(args.out) / TEMPLATES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
