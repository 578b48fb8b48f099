"""megavl-synth-shapes: a deterministic captioned-shapes dataset for CPU demos and retrieval checks.

Each image holds 1-3 shapes (circle, square, triangle, cross) in distinct cells of a 3x3 grid, each
with one of six colours and a small or large size, on a plain light background. Captions describe
them compositionally, so alignment is learnable and retrieval measurable:
  1 shape:  "a small red circle in the top left"
  2 shapes: "a small red circle left of a large blue square"
  3 shapes: "a small red circle left of a large blue square, a large green cross below it"
Shapes are listed left to right (then top to bottom), relations are taken from the grid cells.

    megavl-synth-shapes --out DIR --num-train N --num-val M --seed S [--image-size 64]
                        [--samples-per-shard K]
writes DIR/train-NNNNNN.tar, DIR/val-NNNNNN.tar and DIR/stats.json. Same arguments, same bytes.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw

from megavl.data.seeds import derive_seed
from megavl.data.writer import ShardWriter

COLOURS = {"red": (215, 35, 35), "green": (35, 160, 50), "blue": (40, 70, 215),
           "yellow": (235, 200, 25), "purple": (140, 50, 175), "orange": (240, 125, 25)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.5, "large": 0.9}  # fraction of a grid cell
GRID = 3
BACKGROUND = (240, 240, 240)
SUPERSAMPLE = 4  # draw large, then downscale: clean anti-aliased edges
POSITION_NAMES = [["in the top left", "at the top", "in the top right"],
                  ["on the left", "in the center", "on the right"],
                  ["in the bottom left", "at the bottom", "in the bottom right"]]


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    row: int
    col: int

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind}"


def relation(a: Shape, b: Shape) -> str:
    """Where `a` is relative to `b` (columns first: "left of" reads better than "above")."""
    if a.col != b.col:
        return "left of" if a.col < b.col else "right of"
    return "above" if a.row < b.row else "below"


def caption(shapes: list[Shape]) -> str:
    """Compositional caption of shapes already sorted left to right."""
    if len(shapes) == 1:
        s = shapes[0]
        return f"{s.phrase()} {POSITION_NAMES[s.row][s.col]}"
    text = f"{shapes[0].phrase()} {relation(shapes[0], shapes[1])} {shapes[1].phrase()}"
    if len(shapes) == 3:
        text += f", {shapes[2].phrase()} {relation(shapes[2], shapes[1])} it"
    return text


def sample_shapes(rng: random.Random) -> list[Shape]:
    cells = rng.sample(range(GRID * GRID), rng.randint(1, 3))
    shapes = [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)),
                    cell // GRID, cell % GRID) for cell in cells]
    return sorted(shapes, key=lambda s: (s.col, s.row))


def draw(shapes: list[Shape], image_size: int, rng: random.Random) -> Image.Image:
    canvas = image_size * SUPERSAMPLE
    cell = canvas / GRID
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for s in shapes:
        side = cell * SIZES[s.size]
        slack = (cell - side) / 2
        cx = (s.col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        cy = (s.row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
        draw_shape(pen, s.kind, cx, cy, side / 2, COLOURS[s.colour])
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def draw_shape(pen: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, h: float,
               colour: tuple[int, int, int]) -> None:
    """One filled shape centred at (cx, cy) with half-side h (also used by synth_videos)."""
    if kind == "circle":
        pen.ellipse([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif kind == "square":
        pen.rectangle([cx - h * 0.85, cy - h * 0.85, cx + h * 0.85, cy + h * 0.85], fill=colour)
    elif kind == "triangle":
        pen.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=colour)
    else:  # cross
        t = h / 3
        pen.rectangle([cx - h, cy - t, cx + h, cy + t], fill=colour)
        pen.rectangle([cx - t, cy - h, cx + t, cy + h], fill=colour)


def write_split(out: str, split: str, count: int, seed: int, image_size: int,
                samples_per_shard: int) -> dict[str, int]:
    """Write one split; returns its shard counts."""
    rng = random.Random(derive_seed(seed, "synth-shapes", split))
    writer = ShardWriter(out, samples_per_shard, prefix=f"{split}-")
    for i in range(count):
        shapes = sample_shapes(rng)
        text = caption(shapes)
        buf = io.BytesIO()
        draw(shapes, image_size, rng).save(buf, format="PNG", optimize=False)
        key = f"{split}{i:08d}"
        meta = {"key": key, "caption": text, "image_id": i,
                "shapes": [s.__dict__ for s in shapes]}
        writer.write(key, {"png": buf.getvalue(), "txt": text.encode(),
                           "json": json.dumps(meta).encode()})
    writer.close()
    return writer.counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavl-synth-shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, required=True)
    parser.add_argument("--num-val", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.num_train < 0 or args.num_val < 0 or args.image_size < 8:
        parser.error("counts must be >= 0 and --image-size >= 8")
    for split, count in (("train", args.num_train), ("val", args.num_val)):
        if count:
            counts = write_split(args.out, split, count, args.seed, args.image_size,
                                 args.samples_per_shard)
            print(f"{split}: {count} samples in {len(counts)} shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
