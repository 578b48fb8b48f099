"""Does the flexible encoder use time? Video retrieval after the same pre-training with T=4 vs T=1.

    python bench/bench_video_retrieval.py [--out outputs/bench_video_retrieval] [--steps 600]
                                          [--num-train 2048] [--num-val 256]
                                          [--seeds 1 2] [--continue-steps 3000]

1. megavl-synth-videos --contrast-pairs: moving-shapes clips in twins, the second the first played
   backwards, so every caption has a twin that differs only in the motion ("moves to the left" vs
   "to the right", "grows" vs "shrinks") over the same set of frames: one frame cannot tell them
   apart.
2. Two pre-training runs (configs/tiny.yaml at 32 px, ITC + ITM + MLM, one process, ZeRO-0), same
   seed, data order and steps, the same model (temporal table of 4 entries): data.num_frames=4
   and data.num_frames=1 (one clip = its middle frame in evaluation, a random frame in training).
3. Zero-shot retrieval on the val clips (twins too) from each run's export, with the pre-training
   evaluation (tasks/pretrain_eval.py): ITC alone, and ITC top-16 re-scored by ITM (a tiny run's ITM
   head learns late, so both are reported).
Also printed: the "motion-blind ceiling", the R@1 of an ideal model that knows colour,
shape and the still shape but not the motion (each caption ranks the clips that match it up to
the motion word equally): T=1 cannot beat it, a model that uses time can.

The second figure: image retrieval after image+video pre-training vs image-only, at equal image
steps (the mixed run makes as many video steps on top; `data.video_share=0.5`). If the mixed run
fails the row says "skipped" with its error.

The third: video pre-training continued from that image-only export (`task.init_from`; its temporal
table is still zero: images are 1-frame clips, which read no table), 2.5x steps, T=4 vs T=1. The
image start already knows colour, shape and the spatial words, so what is left to learn on the twins
is the motion: twin accuracy above 50% and an R@1 above the motion-blind ceiling need frame order.
`--continue-steps` sets its budget.

`--seeds S ...` runs the second and third sides again under each seed (run.seed and data.seed; the
third from the same seed-0 image-only export), under <out>/seedS: one seed's ratio is noisy.

A finished run under <out> is reused when its command and the training code (megavl/, configs/,
ds_configs/) are unchanged, and trained again otherwise; new clip arguments discard every run.
Writes <out>/bench_video_retrieval.json; `rows(device, quick)` gives bench/run_all.py its rows.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IMAGE_SIZE = 32  # 4x4 patches of 8 px per frame: a 4-frame step costs what one 64 px image does
COMMON = ["objectives.mim_pixel.weight=0", "objectives.mim_sem.weight=0", "objectives.scl.weight=0",
          f"model.vision.img_size={IMAGE_SIZE}", f"data.image_size={IMAGE_SIZE}",
          "model.vision.num_frames=4", "run.eval_every=-1", "run.image_log_every=0", "data.num_workers=1",
          # no sample shuffle: a batch holds consecutive clips, i.e. whole twins, so every caption's
          # hardest negative (its twin, the same frames backwards) is in its batch. With a shuffle
          # buffer a twin rarely shares a batch and 800 steps of T=4 did not learn the direction
          # (twin accuracy 51%, README)
          "data.shuffle_buffer=0"]
RERANK_K = 16
CONTINUE_FACTOR = 5  # halves: video pre-training from the image-only export runs 2.5x its steps


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    from megavl.engine.launch import child_env

    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)


def _checked(cmd: list[str]) -> None:
    proc = _run(cmd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-4000:]}")


def synth(out: Path, num_train: int, num_val: int) -> Path:
    videos = out / "videos"
    args = ["--num-train", str(num_train), "--num-val", str(num_val), "--seed", "0", "--image-size",
            str(IMAGE_SIZE), "--samples-per-shard", "512", "--contrast-pairs"]
    stamp = videos / "bench_args.json"  # reuse a set only if it was made with these arguments
    if not stamp.is_file() or json.loads(stamp.read_text()) != args:
        # runs trained on other clips too ("mixed": the equal-total-steps variant)
        for stale in ("videos", "t4", "t1", "mixed", "mixed_equal_image_steps", "image_only", "continued_t4",
                      "continued_t1", *(p.name for p in out.glob("seed*"))):
            shutil.rmtree(out / stale, ignore_errors=True)
        _checked([str(BIN / "megavl-synth-videos"), "--out", str(videos), *args])
        stamp.write_text(json.dumps(args))
    return videos


def _shards(folder: Path, split: str) -> list[str]:
    return sorted(str(p) for p in folder.glob(f"{split}-*.tar"))


def _listed(paths: list[str]) -> str:
    return "[" + ",".join(paths) + "]"


def pretrain_and_eval(out: Path, train: str, val: list[str], steps: int, frames: int, *extra: str) -> dict | str:
    """Pre-train (ZeRO-0, one process), export, and return zero_shot_retrieval(export), or the
    failing run's last error line. A finished run of the same command and code is not trained again."""
    cmd = _train_command(out, train, val, steps, frames, *extra)
    stamp = out / "bench_stamp.json"  # what the run in `out` was trained with
    recipe = {"command": cmd, "code": _code_hash()}
    if not stamp.is_file() or json.loads(stamp.read_text()) != recipe:
        shutil.rmtree(out, ignore_errors=True)  # an older recipe's run (a directory this bench made)
        proc = _run(cmd)
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            return next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "no output")
        stamp.write_text(json.dumps(recipe))
    if not (out / "export" / "model.safetensors").is_file():
        _checked([str(BIN / "megavl-export"), str(out / "checkpoints"), str(out / "export")])
    return zero_shot_retrieval(out / "export", val, frames)


def _train_command(out: Path, train: str, val: list[str], steps: int, frames: int, *extra: str) -> list[str]:
    return [sys.executable, "megavl/train.py", "--ds_config", "ds_configs/zero0.json", "--config",
            "configs/tiny.yaml", "--resume", "none", "--set", f"run.output_dir={out}",
            f"data.train_shards={train}", f"data.val_shards=[{','.join(val)}]", f"run.max_steps={steps}",
            f"run.checkpoint_every={steps}", "run.log_every=10", f"data.num_frames={frames}", *COMMON, *extra]


def _code_hash() -> str:
    """The training code and recipes a run used: any change to them retrains (not just new steps)."""
    digest = hashlib.sha256()
    for path in sorted([*(REPO / "megavl").rglob("*.py"), *(REPO / "configs").glob("*.yaml"),
                        *(REPO / "ds_configs").glob("*.json")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def zero_shot_retrieval(export: Path, val: list[str], frames: int) -> dict:
    """The pre-training evaluation (tasks/pretrain_eval.py) on the val shards with clips of `frames`
    frames: {"itc": metrics of ITC alone, "itm": ITC top-16 re-ranked by ITM}, percentages."""
    import yaml

    from megavl import load_pretrained
    from megavl.config import config_from_dict
    from megavl.data import build_eval_loader
    from megavl.tasks.pretrain_eval import PairBatches, evaluate_retrieval
    from megavl.tasks.retrieval_eval import retrieval_scores

    model = load_pretrained(export)
    cfg = config_from_dict(yaml.safe_load((export / "config.yaml").read_text()))
    cfg.data.val_shards, cfg.data.num_frames, cfg.data.num_workers = list(val), frames, 0
    out = {}
    for name, k in (("itc", 0), ("itm", RERANK_K)):
        metrics = evaluate_retrieval(model, build_eval_loader(cfg.data, rank=0, world_size=1),
                                     torch.device("cpu"), itm_rerank_k=k, mode="two")
        out[name] = {key: metrics[key] for key in ("tr1", "tr5", "ir1", "ir5", "r_mean")}
    pairs = PairBatches(build_eval_loader(cfg.data, rank=0, world_size=1))
    sim, _ = retrieval_scores(model, pairs.images(), pairs.texts(), device=torch.device("cpu"),
                              dtype=torch.float32, k=0, mode="two", rerank="none")
    out["itc"]["twin"] = twin_accuracy(sim)
    out["motion_seen"] = motion_seen(model, build_eval_loader(cfg.data, rank=0, world_size=1))
    return out


@torch.no_grad()
def motion_seen(model, loader) -> dict:
    """Why a twin is or is not told apart: mean cosine of the ITC embeddings of twin captions
    (1.0 = the text tower ignores the motion word) and of each clip with its frames reversed
    (1.0 = the vision tower ignores frame order)."""
    model.eval()
    caption_cos, clip_cos = [], []
    for batch in loader:
        text = model.text_embedding(model.encode_text(batch["input_ids"], batch["attention_mask"]))
        n = len(text) - len(text) % 2
        caption_cos.append((text[0:n:2] * text[1:n:2]).sum(-1))
        if batch["images"].ndim == 5 and batch["images"].shape[1] > 1:
            clip = model.image_embedding(model.encode_image(batch["images"]))
            backwards = model.image_embedding(model.encode_image(batch["images"].flip(1)))
            clip_cos.append((clip * backwards).sum(-1))
    return {"caption_twin_cos": torch.cat(caption_cos).mean().item(),
            "clip_reversed_cos": torch.cat(clip_cos).mean().item() if clip_cos else None}


def twin_accuracy(sim_i2t) -> float:
    """% of (caption, clip) pairs scored above the twin: caption 2m+s belongs to clip 2m+s, and clip
    2m+1 is clip 2m played backwards; both directions (caption vs twin clip, clip vs twin caption)
    averaged. 50 = the motion is not seen (a single frame's best)."""
    n = sim_i2t.shape[0] - sim_i2t.shape[0] % 2
    index = torch.arange(n)
    own, twin = sim_i2t.diagonal()[:n], index ^ 1
    caption_picks_own_clip = own > sim_i2t[twin, index]
    clip_picks_own_caption = own > sim_i2t[index, twin]
    return 50.0 * (caption_picks_own_clip.float().mean() + clip_picks_own_caption.float().mean()).item()


def motion_blind_ceiling(annotations: Path) -> float:
    """Expected R@1 (%, either direction) of a model that knows everything but the motion word."""
    captions = [json.loads(line)["caption"] for line in annotations.read_text().splitlines() if line]
    blind = [re.sub(r" (moves to the left|moves to the right|moves up|moves down|grows|shrinks)", " MOVES", c)
             for c in captions]
    group = Counter(blind)
    return 100 * sum(1 / group[b] for b in blind) / len(blind)


def measure(out: Path, steps: int, num_train: int, num_val: int, with_mixed: bool = True,
            seeds: tuple[int, ...] = (), continue_steps: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    videos = synth(out, num_train, num_val)
    train, val = _listed(_shards(videos, "train")), _shards(videos, "val")
    result: dict = {"steps": steps, "num_train": num_train, "num_val": num_val,
                    "chance_r1": 100 / num_val, "motion_blind_r1": motion_blind_ceiling(videos / "msrvtt_val.jsonl")}
    for frames in (4, 1):
        metrics = pretrain_and_eval(out / f"t{frames}", train, val, steps, frames)
        if isinstance(metrics, str):
            raise RuntimeError(f"T={frames} pre-training failed: {metrics}")
        result[f"t{frames}"] = metrics
    result["mixed"] = (mixed_vs_image_only(out, videos, steps) if with_mixed
                       else {"skipped": "quick mode (two more pre-training runs)"})
    image_export = out / "image_only" / "export"
    if "image_only" in result["mixed"]:  # this run's image-only export, not an older one
        continued_steps = result["continue_steps"] = continue_steps or CONTINUE_FACTOR * steps // 2
        result.update(continued_from(image_export, out, train, val, continued_steps))
        # the same comparisons under other seeds (run.seed: init and masking; data.seed: frames and
        # crops), continued from the same image-only export: the spread one seed hides
        for seed in seeds:
            seeded = (f"run.seed={seed}", f"data.seed={seed}")
            result[f"seed{seed}"] = {
                **continued_from(image_export, out / f"seed{seed}", train, val, continued_steps, *seeded),
                "mixed": mixed_vs_image_only(out / f"seed{seed}", videos, steps, *seeded)}
    result["seconds"] = round(time.time() - start, 1)
    (out / "bench_video_retrieval.json").write_text(json.dumps(result, indent=1))
    return result


def continued_from(image_export: Path, out: Path, train: str, val: list[str], steps: int, *extra: str) -> dict:
    """Video pre-training from the image-only export, T=4 and T=1: {"continued_t4": ..., "continued_t1": ...}."""
    result = {}
    for frames in (4, 1):
        metrics = pretrain_and_eval(out / f"continued_t{frames}", train, val, steps, frames,
                                    f"task.init_from={image_export}", *extra)
        if isinstance(metrics, str):
            raise RuntimeError(f"continued T={frames} pre-training failed: {metrics}")
        result[f"continued_t{frames}"] = metrics
    return result


def mixed_vs_image_only(out: Path, videos: Path, steps: int, *extra: str) -> dict:
    """Image retrieval (val images) after image-only vs image + video pre-training at equal image
    steps: the mixed run makes `steps` image steps and `steps` video steps (data.video_share=0.5)."""
    shapes = videos.parent / "shapes"  # one image set for every seed
    if not (shapes / "val-000000.tar").is_file():
        _checked([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(shapes), "--num-train",
                  "2048", "--num-val", "256", "--seed", "0", "--image-size", str(IMAGE_SIZE),
                  "--samples-per-shard", "512"])
    images, val = _shards(shapes, "train"), _shards(shapes, "val")
    # shuffled (not COMMON's in-order reading): batches really mix the sources
    shuffled = "data.shuffle_buffer=1000"
    mixed = pretrain_and_eval(out / "mixed_equal_image_steps", _listed(images + _shards(videos, "train")), val,
                              2 * steps, 4, shuffled, "data.video_share=0.5", *extra)
    if isinstance(mixed, str):  # the image-only side is not worth its minutes without the other
        return {"skipped": f"mixed image+video pre-training failed: {mixed[:200]}"}
    image_only = pretrain_and_eval(out / "image_only", _listed(images), val, steps, 4, shuffled, *extra)
    if isinstance(image_only, str):
        raise RuntimeError(f"image-only pre-training failed: {image_only}")
    return {"mixed": mixed, "image_only": image_only}


def rows(device, quick: bool) -> list:
    from harness import Row

    out = REPO / "outputs" / ("bench_video_retrieval_quick" if quick else "bench_video_retrieval")
    r = measure(out, 2 if quick else 600, 64 if quick else 2048, 32 if quick else 256, with_mixed=not quick)
    case = f"synthetic moving-shapes twins, {r['num_val']} val clips, {r['steps']} pre-training steps"
    note = (f"zero-shot; chance {r['chance_r1']:.2f}, motion-blind ceiling {r['motion_blind_r1']:.2f}; "
            f"one process, ZeRO-0, {r['seconds']} s; higher is better")
    out_rows = []
    for scoring, label in (("itc", "ITC"), ("itm", f"ITC top-{RERANK_K} + ITM")):
        for key, what in (("ir1", "text->video R@1 (%)"), ("tr1", "video->text R@1 (%)")):
            out_rows.append(Row("video retrieval", f"{case}, {label}", what, r["t4"][scoring][key],
                                r["t1"][scoring][key], "T=1 (same model, steps, seed)",
                                "" if quick else ">= 1.5x", note=note))
    mixed = r["mixed"]
    image_case = "image retrieval (shapes val) after image+video vs image-only pre-training, ITC"
    if "skipped" in mixed:
        out_rows.append(Row("video retrieval", image_case, "text->image R@1 (%)", None, None, "image-only", "",
                            note="skipped: " + mixed["skipped"]))
    else:
        out_rows.append(Row("video retrieval", image_case, "text->image R@1 (%)", mixed["mixed"]["itc"]["ir1"],
                            mixed["image_only"]["itc"]["ir1"], "image-only", ">= 0.8x",
                            note="must not collapse; equal image steps (mixed: as many video steps more), same seed"))
    if "continued_t4" in r:
        t4, t1 = r["continued_t4"]["itc"], r["continued_t1"]["itc"]
        case = (f"synthetic moving-shapes twins, {r['num_val']} val clips, {r['continue_steps']} "
                "pre-training steps from the image-only export, ITC")
        for key, what, goal in (("ir1", "text->video R@1 (%)", ">= 1.5x"), ("tr1", "video->text R@1 (%)", ">= 1.5x"),
                                ("twin", "twin accuracy (%)", ">= 1.2x")):
            out_rows.append(Row("video retrieval", case, what, t4[key], t1[key], "T=1 (same start, steps, seed)", goal,
                                note=f"frame order: motion-blind ceiling {r['motion_blind_r1']:.2f} R@1, 50 twin"))
    return out_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench_video_retrieval")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--num-train", type=int, default=2048)
    parser.add_argument("--num-val", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="*", default=[],
                        help="also run the second and third sides with these seeds (from the same image-only export)")
    parser.add_argument("--continue-steps", type=int, default=0,
                        help="video steps from the image-only export (default: 2.5x --steps)")
    args = parser.parse_args(argv)
    result = measure((REPO / args.out).resolve(), args.steps, args.num_train, args.num_val,
                     seeds=tuple(args.seeds), continue_steps=args.continue_steps)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
