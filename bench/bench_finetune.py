"""Fine-tuning from the tiny pre-trained export vs from random initialisation on the shapes tasks.

    python bench/bench_finetune.py [--out outputs/bench_finetune] [--pretrain-steps 100]
                                   [--finetune-steps 40] [--seeds 0 1 2] [--tasks vqa nlvr2]

1. megavl-synth-shapes + a tiny pre-training run (configs/tiny.yaml, one process, ZeRO-0) +
   megavl-export; 2. megavl-synth-downstream; 3. for each task and seed, two fine-tuning runs with
   the same steps, data order and head initialisation: task.init_from=<export> and random init.
Prints and writes <out>/bench_finetune.json and .md: the final metric (VQA minival overall, NLVR2
test-P accuracy, retrieval test r_mean) as mean and spread (min..max) over the seeds.
`rows(device, quick)` gives bench/run_all.py its "finetune" rows (skipped in --quick: the full
bench is ~25 min on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PRETRAIN_STEPS, FINETUNE_STEPS, SEEDS = 100, 40, [0, 1, 2]
TASKS = ["vqa", "nlvr2", "retrieval"]
GOAL = ">= 1.05x"  # pre-training should help: the pre-trained mean at least 5% above random init
METRIC = {"vqa": "overall", "nlvr2": "accuracy", "retrieval": "r_mean"}
SPLITS = {"vqa": ("vqa_val", "vqa_test"), "nlvr2": ("nlvr2_dev", "nlvr2_test"),
          "retrieval": ("retrieval_val", "retrieval_test")}


def _run(cmd: list[str]) -> None:
    from megavl.engine.launch import child_env

    env = child_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-4000:]}")


def pretrain(out: Path, steps: int) -> Path:
    """The tiny pre-training run and its export, cached per step count under <out>/pretrain<steps>."""
    run_dir = out / f"pretrain{steps}"
    export = run_dir / "export"
    if (export / "model.safetensors").is_file():
        return export
    shards = out / "shapes"
    _run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(shards), "--num-train",
          "2048", "--num-val", "64", "--seed", "0", "--image-size", "64",
          "--samples-per-shard", "512"])
    _run([sys.executable, "megavl/train.py", "--ds_config", "ds_configs/zero0.json", "--config",
          "configs/tiny.yaml", "--resume", "none", "--set", f"run.output_dir={run_dir}",
          f"data.train_shards={shards}/train-{{000000..000003}}.tar",
          f"data.val_shards={shards}/val-000000.tar", f"run.max_steps={steps}",
          f"run.checkpoint_every={steps}", "run.eval_every=-1", "run.image_log_every=0"])
    _run([str(BIN / "megavl-export"), str(run_dir / "checkpoints"), str(export)])
    return export


def finetune(task: str, synth: Path, out: Path, steps: int, seed: int, init: str) -> float:
    val, test = SPLITS[task]
    _run([sys.executable, "megavl/train.py", "--ds_config", "ds_configs/zero0.json", "--config",
          f"configs/finetune_{task}_tiny.yaml", "--resume", "none", "--set",
          f"run.output_dir={out}", f"task.image_root={synth}",
          f"task.train=[{synth}/{task}_train.json]", f"task.val={synth}/{val}.json",
          f"task.test={synth}/{test}.json", f"task.init_from={init}", f"run.seed={seed}",
          f"run.max_steps={steps}", f"run.checkpoint_every={steps}", "run.eval_every=0"])
    metrics = json.loads((out / "metrics.json").read_text())
    # VQA's test split has no answers (the server scores it): its held-out minival is the figure
    return metrics["val" if task == "vqa" else "test"][METRIC[task]]


def run(out: Path, pretrain_steps: int, finetune_steps: int, seeds: list[int], tasks: list[str]
        ) -> dict:
    """Every (task, init, seed) fine-tuning run; returns {"rows": [one per task and init], ...}
    and writes <out>/bench_finetune.json and .md."""
    start = time.time()
    export = pretrain(out, pretrain_steps)
    pretrain_s = time.time() - start
    print(f"pre-training + export: {pretrain_s:.0f} s", flush=True)
    synth = out / "shapes_downstream"
    if not (synth / "stats.json").is_file():
        _run([str(BIN / "megavl-synth-downstream"), "--out", str(synth), "--seed", "0",
              "--num-train", "256", "--num-eval", "64", "--image-size", "64"])
    rows = []
    for task in tasks:
        scores: dict[str, list[float]] = {"pretrained": [], "random": []}
        for seed in seeds:
            for name, init in (("pretrained", str(export)), ("random", "")):
                run_dir = out / f"{task}_{name}_seed{seed}"
                began = time.time()
                scores[name].append(finetune(task, synth, run_dir, finetune_steps, seed, init))
                print(f"{task} {name} seed {seed}: {METRIC[task]} {scores[name][-1]:.2f} "
                      f"({time.time() - began:.0f} s)", flush=True)
        for name, values in scores.items():
            rows.append({"task": task, "init": name, "metric": METRIC[task], "values": values,
                         "mean": statistics.mean(values), "min": min(values), "max": max(values)})
    result = {"rows": rows, "pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps,
              "seeds": seeds, "pretrain_s": round(pretrain_s), "wall_s": round(time.time() - start)}
    (out / "bench_finetune.md").write_text(markdown(result))
    (out / "bench_finetune.json").write_text(json.dumps(result, indent=2))
    return result


def markdown(result: dict) -> str:
    lines = ["| task | init | metric | mean | min..max | seeds |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['init']} | {r['metric']} | {r['mean']:.2f} | "
              f"{r['min']:.2f}..{r['max']:.2f} | {len(r['values'])} |" for r in result["rows"]]
    return "\n".join(lines) + (f"\n\n{result['pretrain_steps']} pre-training steps, "
                               f"{result['finetune_steps']} fine-tuning steps, "
                               f"{result['wall_s']} s wall ({result['pretrain_s']} s pre-training)\n")


def rows(device, quick: bool):
    """bench/run_all.py's rows: per task, the pre-trained mean vs the random-init mean."""
    from harness import Row

    case = "tiny, shapes {task}, {n} seeds"
    if quick:
        return [Row("finetune", case.format(task=t, n=len(SEEDS)), METRIC[t], None, None, "random init",
                    GOAL, note="skipped in --quick (~25 min: python bench/bench_finetune.py)")
                for t in TASKS]
    result = run(REPO / "outputs" / "bench_finetune", PRETRAIN_STEPS, FINETUNE_STEPS, SEEDS, TASKS)
    by = {(r["task"], r["init"]): r for r in result["rows"]}
    out = []
    for task in TASKS:
        pre, rand = by[task, "pretrained"], by[task, "random"]
        out.append(Row("finetune", case.format(task=task, n=len(SEEDS)), f"{METRIC[task]} (mean)",
                       pre["mean"], rand["mean"], "random init", GOAL,
                       note=f"min..max pre-trained {pre['min']:.1f}..{pre['max']:.1f}, random "
                            f"{rand['min']:.1f}..{rand['max']:.1f}; {PRETRAIN_STEPS} pre-training, "
                            f"{FINETUNE_STEPS} fine-tuning steps, same seeds/data order"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench_finetune")
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--finetune-steps", type=int, default=FINETUNE_STEPS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    args = parser.parse_args(argv)
    result = run((REPO / args.out).resolve(), args.pretrain_steps, args.finetune_steps, args.seeds,
                 args.tasks)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
