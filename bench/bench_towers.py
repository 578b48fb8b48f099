"""FLIP patch dropout on the 4M recipe's towers: step FLOPs and CPU step time, keep 1.0 vs 0.5.

One process, the 4M recipe's model (ViT-B/16 at 256 px, BERT-base, 6 fusion layers; random weights)
and objective settings (ITC queue + momentum distillation, hard-negative ITM), a synthetic micro-batch.
Per case: the analytic step FLOPs (tasks/pretrain_flops.py, exact against FlopCounterMode in the
tests) and the median wall time of forward + backward + AdamW step, the two keep ratios interleaved
rep by rep so that a neighbour's load hits both alike.

  itc+itm   the objectives patch dropout is for (FLIP: contrastive pre-training), plus ITM on the
            same unimodal tokens; the ITC teacher still encodes every patch.
  all       every objective of the recipe (the masked passes keep their own masks).

    python bench/bench_towers.py --batch 4 --reps 3 --out benchmarks/towers_cpu2core_202612.md
"""
from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import RECIPES, interleaved_median, machine_line, synthetic_batch  # noqa: E402

from megavl.config import OBJECTIVE_NAMES, load_config  # noqa: E402
from megavl.tasks.pretrain import PretrainModule  # noqa: E402
from megavl.tasks.pretrain_flops import step_flops  # noqa: E402

TEXT_LEN = 30  # the 4M recipe's data.max_text_len
CASES = {"itc+itm": ["itc", "itm"], "all": list(OBJECTIVE_NAMES)}
KEEPS = (1.0, 0.5)


def stepper(objectives: list[str], keep: float, batch: dict, mode: str):
    """(one training step as a closure, the analytic FLOPs of that step)."""
    cfg = load_config(RECIPES["4m"], [f"model.vision.patch_dropout={1.0 - keep}"])
    torch.manual_seed(0)
    module = PretrainModule(cfg.model, cfg.objectives, {"single": objectives, "two": objectives}).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        total, _ = module(batch, mode, generator)
        total.backward()
        optimizer.step()

    num_mlm = int((batch["mlm_labels"] != -100).sum())
    flops = step_flops(cfg.model, cfg.objectives, module.active(mode), mode, batch["images"].shape[0], TEXT_LEN,
                       num_mlm).total
    return step, flops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--mode", default="two", choices=["single", "two"])
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    cfg = load_config(RECIPES["4m"])
    batch = synthetic_batch(cfg, args.batch, TEXT_LEN, device)
    rows = []
    for case, objectives in CASES.items():
        steps, flops = {}, {}
        for keep in KEEPS:
            steps[keep], flops[keep] = stepper(objectives, keep, batch, args.mode)
        seconds = interleaved_median({str(k): s for k, s in steps.items()}, device, args.reps, warmup=1)
        for keep in KEEPS:
            rows.append((case, keep, flops[keep] / 1e9, seconds[str(keep)]))
        print(rows[-2], rows[-1], flush=True)
        del steps
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# FLIP patch dropout on the 4M recipe's towers: CPU step, keep 1.0 vs 0.5",
        "",
        f"- **Date:** {datetime.date.today()} (commit {commit}).",
        f"- **Hardware:** {machine_line(device)}.",
        f"- **Command:** `python bench/bench_towers.py --batch {args.batch} --reps {args.reps} --mode {args.mode}` "
        "(one process, under the shared CPU lock).",
        f"- **Model:** `configs/pretrain_4m.yaml` (ViT-B/16 at 256 px = 256 patches, BERT-base, 6 fusion layers, "
        f"ITC queue 65536 + distillation), random weights, micro-batch {args.batch}, text length {TEXT_LEN}, "
        f"fusion mode {args.mode}; keep 0.5 = `model.vision.patch_dropout=0.5`. Step = forward + backward + "
        "AdamW; time = median over the reps, keeps interleaved.",
        "",
        "| objectives | keep | step GFLOPs | x of keep 1.0 | CPU step s | x of keep 1.0 |",
        "|---|---|---|---|---|---|",
    ]
    base = {case: (f, s) for case, keep, f, s in rows if keep == 1.0}
    for case, keep, gflops, secs in rows:
        f0, s0 = base[case]
        lines.append(f"| {case} | {keep} | {gflops:.1f} | {gflops / f0:.2f} | {secs:.2f} | {secs / s0:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
