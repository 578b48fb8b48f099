"""megavl-synth-videos: moving-shapes clips as real mp4 files in video2dataset-layout shards.

Each clip shows one shape (synth_shapes' circle/square/triangle/cross in one of six colours)
that moves left, right, up or down, or grows or shrinks, optionally next to a second shape
that stays still. Captions need the motion to be right:
  "the red circle moves to the left"
  "the blue square grows, a green cross stays still"
Why one frame cannot tell the directions apart: a trajectory's endpoints (a, b) are drawn from
a distribution symmetric under swapping them, so a "moves to the left" clip is, in distribution,
a "moves to the right" clip played backwards. The set of frames (hence a frame drawn at random,
or the middle frame a 1-frame evaluation takes) has the same distribution for both captions.

    megavl-synth-videos --out DIR --num-train N --num-val M [--num-test K] --seed S
                        [--image-size 64] [--num-frames 16] [--fps 8] [--samples-per-shard K]
                        [--contrast-pairs]
writes DIR/train-NNNNNN.tar, DIR/val-NNNNNN.tar, DIR/test-NNNNNN.tar (members KEY.mp4, KEY.txt,
KEY.json) for pre-training, and the same clips as an MSRVTT-style retrieval set for the
`retrieval` task: DIR/videos/KEY.mp4 plus DIR/msrvtt_{train,val,test}.jsonl, one
`{"video": "videos/KEY.mp4", "caption": str}` per line (one caption per video, the 1k-A test
protocol's form; task.video_root=DIR). --contrast-pairs makes every second clip the previous one
played backwards: its caption differs only in the motion and its frames are the same set, so
retrieval among such twins measures whether a model uses frame order at all. H.264 (libx264, one thread) in mp4 through PyAV. Same arguments, same clips:
the trajectories, captions and json are identical; x264 (core 165 in PyAV 18's wheel) is not
bit-reproducible between encoder instances in one process, so the mp4 bytes and the decoded
pixels can differ slightly (mean |diff| well under 2 of 255), never in what a clip shows.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from megavl.data.seeds import derive_seed
from megavl.data.writer import ShardWriter
from megavl.tools.synth_shapes import BACKGROUND, COLOURS, SHAPES, SUPERSAMPLE, draw_shape

MOTIONS = {"left": "moves to the left", "right": "moves to the right", "up": "moves up",
           "down": "moves down", "grow": "grows", "shrink": "shrinks"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink",
            "shrink": "grow"}
MIN_TRAVEL = 0.35   # fraction of the frame a moving shape covers at least (a clear motion)
SIZE_RANGE = (0.08, 0.24)  # half-side as a fraction of the frame, for growing/shrinking shapes
MOVING_HALF = 0.11  # half-side of a moving shape
VIDEO_DIR = "videos"  # the mp4 files of the retrieval annotations, under --out


@dataclass(frozen=True)
class Clip:
    """One clip's content: a moving shape's trajectory (start -> end) and an optional still shape."""

    kind: str
    colour: str
    motion: str
    start: tuple[float, float, float]  # (cx, cy, half-side), fractions of the frame
    end: tuple[float, float, float]
    still_kind: str | None = None
    still_colour: str | None = None
    still_at: tuple[float, float, float] | None = None

    def reversed(self) -> "Clip":
        """The same clip played backwards: the opposite motion, the same set of frames."""
        return Clip(self.kind, self.colour, OPPOSITE[self.motion], self.end, self.start,
                    self.still_kind, self.still_colour, self.still_at)

    def caption(self) -> str:
        text = f"the {self.colour} {self.kind} {MOTIONS[self.motion]}"
        if self.still_kind is not None:
            article = "an" if self.still_colour[0] in "aeiou" else "a"
            text += f", {article} {self.still_colour} {self.still_kind} stays still"
        return text


def _endpoints(rng: random.Random, lo: float, hi: float, min_gap: float) -> tuple[float, float]:
    """(a, b) in [lo, hi] with |a - b| >= min_gap; swapping a and b is as likely as not."""
    while True:
        a, b = rng.uniform(lo, hi), rng.uniform(lo, hi)
        if abs(a - b) >= min_gap:
            return a, b


def sample_clip(rng: random.Random) -> Clip:
    kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    axis = rng.choice(("x", "y", "size"))
    margin = SIZE_RANGE[1] if axis == "size" else MOVING_HALF
    if axis == "size":
        a, b = _endpoints(rng, *SIZE_RANGE, min_gap=0.4 * (SIZE_RANGE[1] - SIZE_RANGE[0]))
        cx, cy = rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)
        start, end, motion = (cx, cy, a), (cx, cy, b), ("grow" if b > a else "shrink")
    else:
        a, b = _endpoints(rng, margin, 1 - margin, MIN_TRAVEL)
        other = rng.uniform(margin, 1 - margin)
        if axis == "x":
            start, end, motion = (a, other, MOVING_HALF), (b, other, MOVING_HALF), ("right" if b > a else "left")
        else:
            start, end, motion = (other, a, MOVING_HALF), (other, b, MOVING_HALF), ("down" if b > a else "up")
    if rng.random() < 0.5:
        still_kind = rng.choice([s for s in SHAPES if s != kind])
        still_colour = rng.choice([c for c in COLOURS if c != colour])
        still_at = (rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), 0.08)
        return Clip(kind, colour, motion, start, end, still_kind, still_colour, still_at)
    return Clip(kind, colour, motion, start, end)


def render(clip: Clip, image_size: int, num_frames: int) -> list[np.ndarray]:
    """The clip's frames, uint8 (S, S, 3) each; the moving shape interpolates start -> end linearly
    and is drawn over the still one."""
    canvas = image_size * SUPERSAMPLE
    frames = []
    for t in range(num_frames):
        w = t / max(num_frames - 1, 1)
        image = Image.new("RGB", (canvas, canvas), BACKGROUND)
        pen = ImageDraw.Draw(image)
        if clip.still_kind is not None:
            sx, sy, sh = clip.still_at
            draw_shape(pen, clip.still_kind, sx * canvas, sy * canvas, sh * canvas, COLOURS[clip.still_colour])
        cx, cy, h = ((1 - w) * s + w * e for s, e in zip(clip.start, clip.end))
        draw_shape(pen, clip.kind, cx * canvas, cy * canvas, h * canvas, COLOURS[clip.colour])
        frames.append(np.asarray(image.resize((image_size, image_size), Image.Resampling.LANCZOS)))
    return frames


def encode_mp4(frames: list[np.ndarray], fps: int = 8, crf: int = 18, gop: int | None = None) -> bytes:
    """uint8 (H, W, 3) RGB frames (even H and W) -> H.264 mp4 bytes, encoded in memory.

    gop: frames between keyframes (None: x264's default, 250)."""
    import av

    height, width = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # One thread: no frame-order races between encoder threads.
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1",
                          "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0",
                          **({"g": str(gop)} if gop else {})}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def write_split(out: str, split: str, count: int, seed: int, image_size: int, num_frames: int,
                fps: int, samples_per_shard: int, contrast_pairs: bool = False) -> dict[str, int]:
    """Write one split as shards and as mp4 files + DIR/msrvtt_<split>.jsonl; returns its shard
    counts. contrast_pairs: every odd clip is the previous one reversed (captions that differ
    only in the motion, over the same frames)."""
    rng = random.Random(derive_seed(seed, "synth-videos", split))
    writer = ShardWriter(out, samples_per_shard, prefix=f"{split}-")
    os.makedirs(os.path.join(out, VIDEO_DIR), exist_ok=True)
    clip = None
    with open(os.path.join(out, f"msrvtt_{split}.jsonl"), "w", encoding="utf-8") as annotations:
        for i in range(count):
            clip = clip.reversed() if contrast_pairs and i % 2 else sample_clip(rng)
            text = clip.caption()
            key = f"{split}{i:08d}"
            meta = {"key": key, "caption": text, "status": "success", "image_id": i,
                    "width": image_size, "height": image_size, "frames": num_frames, "fps": fps,
                    "duration": num_frames / fps, "clip": asdict(clip)}
            mp4 = encode_mp4(render(clip, image_size, num_frames), fps)
            writer.write(key, {"mp4": mp4, "txt": text.encode(), "json": json.dumps(meta).encode()})
            video = f"{VIDEO_DIR}/{key}.mp4"
            with open(os.path.join(out, video), "wb") as f:
                f.write(mp4)
            annotations.write(json.dumps({"video": video, "caption": text}) + "\n")
    writer.close()
    return writer.counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megavl-synth-videos", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-train", type=int, required=True)
    parser.add_argument("--num-val", type=int, required=True)
    parser.add_argument("--num-test", type=int, default=0, help="a held-out test split (1k-A style)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--contrast-pairs", action="store_true",
                        help="every second clip is the previous one played backwards")
    args = parser.parse_args(argv)
    if min(args.num_train, args.num_val, args.num_test) < 0:
        parser.error("counts must be >= 0")
    if args.image_size < 16 or args.image_size % 2:
        parser.error("--image-size must be an even number >= 16 (H.264 4:2:0 needs even sides)")
    if args.num_frames < 2 or args.fps < 1:
        parser.error("--num-frames must be >= 2 and --fps >= 1")
    for split, count in (("train", args.num_train), ("val", args.num_val), ("test", args.num_test)):
        if count:
            counts = write_split(args.out, split, count, args.seed, args.image_size, args.num_frames,
                                 args.fps, args.samples_per_shard, args.contrast_pairs)
            print(f"{split}: {count} clips in {len(counts)} shards under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
