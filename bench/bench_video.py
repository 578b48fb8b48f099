"""Video decoding per core: PyAV (megavl.data.decode_video) vs torchcodec, T=4 frames at 224 px.

Both sides do the same work on the same in-memory mp4 bytes, one thread each (= one DataLoader
worker, one core): pick T=4 frames (one random frame per equal segment, the training sampling),
decode them to RGB uint8, resize the short side to 224 and centre-crop 224x224. The clips are
WebVid-like: 640x360 H.264 at 25 fps, 4 s (100 frames), a keyframe every second.

torchcodec does not bundle FFmpeg: it dlopen()s the system's libavutil.so.N (N = 56..60). Where
there is none (our CI machines), the torchcodec side runs linked against PyAV's bundled FFmpeg
through a directory of SONAME links put on LD_LIBRARY_PATH; a torchcodec that cannot load at all
gives a row that says so with its error. Each side runs in its own subprocess per repetition
(LD_LIBRARY_PATH is read at process start), repetitions alternate, the median is reported.

Seeking (`--seek`): clips/s of megavl's decoder on ONE long file, 1280x720 H.264 at 25 fps, 10
minutes, a keyframe every 250 frames (x264's default GOP), written by the bench (preset ultrafast,
low-complexity content: a scrolling block texture and a moving square, so the write stays ~1 min
on one core). Sampled frames reached by seeking to the keyframe before each one (megavl's path)
vs decoding from the start up to the last sampled frame (`decode_frames(seek=False)`); the same
frame ids (one rng seed) and the same resize on both sides, one subprocess each, interleaved.

    python bench/bench_video.py [--quick]
    python bench/bench_video.py --seek [--quick] [--seconds 600]

`run(quick) -> list[dict]` returns one row per decoder; `run_seek(quick, seconds)` one row per path.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

NUM_FRAMES, SIZE = 4, 224
WIDTH, HEIGHT, FPS, SECONDS = 640, 360, 25, 4
LONG_WIDTH, LONG_HEIGHT, LONG_SECONDS, LONG_GOP = 1280, 720, 600, 250


def write_clips(out: str, count: int) -> list[str]:
    """`count` WebVid-like mp4 files: soft-edged discs drifting over a gradient."""
    from megavl.tools.synth_videos import encode_mp4

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    background = np.repeat((xx / WIDTH * 255)[..., None], 3, axis=2)
    paths = []
    for c in range(count):
        discs = [(rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(20, 120),
                  rng.uniform(-6, 6), rng.uniform(-4, 4), rng.uniform(0, 255, 3)) for _ in range(8)]
        frames = []
        for t in range(FPS * SECONDS):
            frame = background.copy()
            for x, y, r, dx, dy, colour in discs:
                dist = np.sqrt((xx - x - dx * t) ** 2 + (yy - y - dy * t) ** 2)
                alpha = np.clip(r - dist, 0, 3)[..., None] / 3  # a 3-pixel soft edge
                frame = frame * (1 - alpha) + colour * alpha
            frames.append(frame.astype(np.uint8))
        path = os.path.join(out, f"clip{c:03d}.mp4")
        with open(path, "wb") as f:
            f.write(encode_mp4(frames, fps=FPS, crf=23, gop=FPS))
        paths.append(path)
    return paths


def _resize(clip_T3HW: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(SIZE, antialias=True), v2.CenterCrop(SIZE)])(clip_T3HW)


def _pyav(data: bytes, rng: random.Random) -> torch.Tensor:
    from megavl.data.decode_video import decode_frames

    clip, _ = decode_frames(data, NUM_FRAMES, rng, max_pixels=1 << 30)
    return clip


def _torchcodec(data: bytes, rng: random.Random, seek_mode: str) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    from megavl.data.decode_video import sample_frame_ids

    decoder = VideoDecoder(data, seek_mode=seek_mode, num_ffmpeg_threads=1)
    ids = sample_frame_ids(decoder.metadata.num_frames, NUM_FRAMES, rng)
    return decoder.get_frames_at(ids).data


def worker(decoder: str, paths: list[str]) -> float:
    """Clips/s of one decoder over the files (bytes read up front: decoding only)."""
    torch.set_num_threads(1)
    blobs = [open(p, "rb").read() for p in paths]
    decode = {"pyav": _pyav,
              "torchcodec": lambda d, r: _torchcodec(d, r, "exact"),
              "torchcodec-approx": lambda d, r: _torchcodec(d, r, "approximate")}[decoder]
    out = _resize(decode(blobs[0], random.Random(0)))  # warm-up: imports, codec init
    assert out.shape == (NUM_FRAMES, 3, SIZE, SIZE) and out.dtype == torch.uint8, out.shape
    rng = random.Random(1)
    start = time.perf_counter()
    for data in blobs:
        _resize(decode(data, rng))
    return len(blobs) / (time.perf_counter() - start)


def ffmpeg_link_dir(out: str) -> str:
    """A directory of libavX.so.N links to PyAV's bundled FFmpeg libraries (for torchcodec)."""
    import av

    libs = os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs")
    os.makedirs(out, exist_ok=True)
    for path in glob.glob(os.path.join(libs, "lib*-*.so.*")):
        match = re.match(r"lib(av\w+|sw\w+)-[0-9a-f]+\.so\.(\d+)", os.path.basename(path))
        if match:
            os.symlink(path, os.path.join(out, f"lib{match[1]}.so.{match[2]}"))
    return libs


def _measure(decoder: str, paths: list[str], env: dict) -> float | str:
    proc = subprocess.run([sys.executable, __file__, "--worker", decoder, *paths], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.strip().splitlines() if "Error" in ln] or proc.stderr.splitlines()
        return lines[-1][-300:] if lines else f"exit {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])["clips_per_s"]


def write_long_clip(path: str, seconds: int) -> None:
    """A LONG_WIDTH x LONG_HEIGHT H.264 mp4 of `seconds` at FPS, written frame by frame in yuv420p
    (no RGB conversion): an 8-px block texture scrolling 2 px per frame and a bright square."""
    import av

    rng = np.random.default_rng(0)
    width, height = LONG_WIDTH, LONG_HEIGHT
    texture = rng.integers(16, 236, (height // 8, width // 8 + 1), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    yuv = np.full((height * 3 // 2, width), 128, np.uint8)  # Y plane, then U and V at quarter size
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"preset": "ultrafast", "crf": "28", "g": str(LONG_GOP), "threads": "1"}
        for t in range(seconds * FPS):
            shift = (t * 2) % 8
            yuv[:height] = texture[:, shift:shift + width]
            x, y = (t * 4) % (width - 96), (t * 3) % (height - 96)
            yuv[y:y + 96, x:x + 96] = 235
            for packet in stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def seek_worker(path: str, mode: str, clips: int) -> float:
    """Clips/s of decode_frames on one file (read up front), `clips` samplings of T frames."""
    from megavl.data.decode_video import decode_frames

    torch.set_num_threads(1)
    data = open(path, "rb").read()
    seek = {"seek": True, "sequential": False}[mode]
    _resize(decode_frames(data, NUM_FRAMES, None, max_pixels=1 << 30, seek=True)[0])  # warm-up: imports, codec
    rng = random.Random(1)  # both modes: the same frame ids
    start = time.perf_counter()
    for _ in range(clips):
        out = _resize(decode_frames(data, NUM_FRAMES, rng, max_pixels=1 << 30, seek=seek)[0])
    assert out.shape == (NUM_FRAMES, 3, SIZE, SIZE), out.shape
    return clips / (time.perf_counter() - start)


def run_seek(quick: bool, seconds: int | None = None) -> list[dict]:
    """Rows {path, seconds, clips, clips_per_s_per_core, ...} for "sequential" and "seek"."""
    seconds = seconds or (20 if quick else LONG_SECONDS)
    clips = {"sequential": 2, "seek": 4} if quick else {"sequential": 3, "seek": 20}
    repeats = 1 if quick else 2
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "long.mp4")
        start = time.perf_counter()
        write_long_clip(path, seconds)
        write_s, size = time.perf_counter() - start, os.path.getsize(path)
        results: dict[str, list[float]] = {"sequential": [], "seek": []}
        for _ in range(repeats):
            for mode in results:
                proc = subprocess.run([sys.executable, __file__, "--seek-worker", mode, str(clips[mode]), path],
                                      env=env, capture_output=True, text=True, timeout=1800, check=True)
                results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1])["clips_per_s"])
    return [{"path": mode, "width": LONG_WIDTH, "height": LONG_HEIGHT, "fps": FPS, "seconds": seconds,
             "gop": LONG_GOP, "frames": NUM_FRAMES, "size": SIZE, "clips": clips[mode], "repeats": repeats,
             "file_mb": round(size / 1e6, 1), "write_s": round(write_s, 1),
             "clips_per_s_per_core": round(statistics.median(values), 4),
             "s_per_clip": round(1 / statistics.median(values), 3)} for mode, values in results.items()]


def seek_table(rows: list[dict]) -> str:
    first = rows[0]
    head = (f"{first['width']}x{first['height']} H.264, {first['fps']} fps, {first['seconds']} s "
            f"({first['seconds'] * first['fps']} frames, GOP {first['gop']}, {first['file_mb']} MB, written in "
            f"{first['write_s']} s) -> T={first['frames']} at {first['size']} px, one core\n\n")
    lines = ["| path | clips | clips/s per core | s per clip |", "|---|---|---|---|"]
    lines += [f"| {r['path']} | {r['clips']} x {r['repeats']} | {r['clips_per_s_per_core']} | {r['s_per_clip']} |"
              for r in rows]
    speedup = rows[1]["clips_per_s_per_core"] / rows[0]["clips_per_s_per_core"]
    return head + "\n".join(lines) + f"\n\nseek / sequential: {speedup:.1f}x"


def run(quick: bool) -> list[dict]:
    clips, repeats = (2, 1) if quick else (16, 3)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_clips(tmp, clips)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        plain_error = _measure("torchcodec", paths[:1], env)
        linked = ""
        if isinstance(plain_error, str):  # no system FFmpeg: link torchcodec to PyAV's
            links = os.path.join(tmp, "ffmpeg")
            av_libs = ffmpeg_link_dir(links)
            env["LD_LIBRARY_PATH"] = os.pathsep.join([links, av_libs, env.get("LD_LIBRARY_PATH", "")])
            linked = f"no system FFmpeg ({plain_error}); linked to PyAV's bundled FFmpeg"
        results: dict[str, list] = {"pyav": [], "torchcodec": [], "torchcodec-approx": []}
        for _ in range(repeats):
            for decoder in results:
                results[decoder].append(_measure(decoder, paths, env))
    rows = []
    for decoder, values in results.items():
        errors = [v for v in values if isinstance(v, str)]
        rows.append({"decoder": decoder, "clips": clips, "frames": NUM_FRAMES, "size": SIZE,
                     "clips_per_s_per_core": None if errors else round(statistics.median(values), 2),
                     "error": errors[0] if errors else "",
                     "note": linked if decoder.startswith("torchcodec") else ""})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seek", action="store_true", help="seeking vs decoding from the start, one long file")
    parser.add_argument("--seconds", type=int, default=None, help=f"--seek: the file's length (default "
                        f"{LONG_SECONDS}, 20 with --quick)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seek-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps({"clips_per_s": worker(args.worker, args.paths)}))
        return 0
    if args.seek_worker:
        mode, clips = args.seek_worker
        print(json.dumps({"clips_per_s": seek_worker(args.paths[0], mode, int(clips))}))
        return 0
    if args.seek:
        print(seek_table(run_seek(args.quick, args.seconds)))
        return 0
    for row in run(args.quick):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
