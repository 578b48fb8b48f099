"""Run every megavl benchmark and write one table: megavl, its reference, the ratio and the goal.

    python bench/run_all.py                  # the full harness on the available device
    python bench/run_all.py --quick          # tiny shapes, few repetitions (bench/tests runs this)
    python bench/run_all.py --base           # also the base-geometry framework overhead on CPU (slow)

Both sides of every figure are measured in the same run, their repetitions interleaved, medians
reported. Writes <out>/bench.md and <out>/bench.json (default outputs/bench/) and prints the table
with the machine line. On CPU the default is one torch thread: the machine is usually shared, and
one thread keeps a neighbour's load from turning into timing noise (--threads to change it).

`run(quick, out) -> list[dict]` is the importable entry point.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench modules, when imported from bench/tests

import torch  # noqa: E402

if not torch.cuda.is_available():  # the kernels run in Triton's interpreter without a GPU (as in tests)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import REPO, Row, machine_line  # noqa: E402

GOAL_NONE = ""


def _data_rows(device: torch.device, quick: bool) -> list[Row]:
    import bench_data as data_bench

    rows = data_bench.run(quick)
    ours, plain = rows[0], rows[1]
    case = f"{ours['image']} -> {ours['size']} px, batch {ours['batch']}"
    note = f"{ours['samples']} samples in {ours['shards']} shards, one core, median of {ours['reps']}"
    return [Row("data", case, "samples/s per core", ours["samples_per_s_per_core"],
                plain["samples_per_s_per_core"], plain["pipeline"], ">= 1.2x",
                note=note + "; higher is better"),
            Row("data", "tar opens per sample (train read)", "opens/sample", ours["opens_per_sample"],
                plain["opens_per_sample"], plain["pipeline"], GOAL_NONE,
                note="one open per shard per worker; a reader opening each member: 2 (image + txt), 3 with json")]


def _video_rows(device: torch.device, quick: bool) -> list[Row]:
    import bench_video

    rows = {r["decoder"]: r for r in bench_video.run(quick)}
    ours = rows["pyav"]
    case = f"{bench_video.WIDTH}x{bench_video.HEIGHT} H.264 -> T={ours['frames']} at {ours['size']} px"
    out = []
    for name in ("torchcodec", "torchcodec-approx"):
        other = rows[name]
        reference = name.replace("-approx", " (approximate seek)")
        if other["error"]:  # no reference side: the PyAV figure goes in the note
            out.append(Row("video decoding", case, "clips/s per core", None, None, reference, GOAL_NONE,
                           note=f"skipped: torchcodec failed ({other['error']}); PyAV alone "
                                f"{ours['clips_per_s_per_core']} clips/s"))
            continue
        note = f"{ours['clips']} clips, one core; higher is better; {other['note'] or 'system FFmpeg'}"
        out.append(Row("video decoding", case, "clips/s per core", ours["clips_per_s_per_core"],
                       other["clips_per_s_per_core"], reference, GOAL_NONE, note=note))
    sequential, seek = bench_video.run_seek(quick)
    case = (f"{seek['width']}x{seek['height']} H.264, {seek['seconds']} s, GOP {seek['gop']} -> "
            f"T={seek['frames']} at {seek['size']} px")
    out.append(Row("video decoding", case, "clips/s per core", seek["clips_per_s_per_core"],
                   sequential["clips_per_s_per_core"], "decode from the start", GOAL_NONE,
                   note="megavl seeks to the keyframe before each sampled frame; one core; higher is better"))
    return out


def _kernel_rows(device: torch.device, quick: bool) -> list[Row]:
    import bench_kernels as kernels

    dtype = "bf16" if device.type == "cuda" else "fp32"
    shapes = None  # bench_kernels.py's own: QUICK_SHAPES or the ViT-B/L batches of the goal
    if device.type == "cpu" and not quick:  # the goal's B=256 takes minutes per op on a CPU
        shapes = [kernels.Shape("vit_b16_224_b8", B=8, N=196, D=768, K=49)]
    note = ("CPU: reference path (no Triton kernel runs), timings for reference only" if device.type == "cpu"
            else "CUDA, L2 flushed")
    return [Row("kernels", f"{r['op']} {r['shape']}", "ms", r["fused_ms"], r["composite_ms"], "torch composite",
                GOAL_NONE, note=f"{note}; {r['backend']}, {r['dtype']}, fused/copy {r['fused_vs_copy']:.2f}")
            for r in kernels.run(device, dtype, shapes=shapes, quick=quick)]


def _sections(include_base: bool) -> list[tuple[str, Callable[[torch.device, bool], list[Row]]]]:
    import bench_checkpoint
    import bench_ema
    import bench_finetune
    import bench_itm_exchange
    import bench_model
    import bench_retrieval
    import bench_step
    import bench_video_retrieval
    import bench_zero
    import bench_zero3_curriculum

    return [
        ("masked encoding", bench_model.masked_encoding),
        ("framework overhead", lambda d, q: bench_step.framework_rows(d, q, include_base)),
        ("ZeRO-3 memory", bench_zero.zero3_memory),
        ("ITM negatives", bench_itm_exchange.rows),
        ("EMA teacher", bench_ema.rows),
        ("ZeRO-3 curriculum", bench_zero3_curriculum.rows),
        ("checkpoint", bench_checkpoint.checkpoint_rows),
        ("FLOP accounting", bench_model.flop_accounting),
        ("data", _data_rows),
        ("video decoding", _video_rows),
        ("kernels", _kernel_rows),
        ("attention", bench_model.attention_backends),
        ("end to end", bench_step.end_to_end),
        ("retrieval eval", bench_retrieval.rows),
        ("video retrieval", bench_video_retrieval.rows),
        ("finetune", bench_finetune.rows),  # ~25 min on 2 CPU cores; skipped in --quick
    ]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def markdown(rows: list[dict], machine: str) -> str:
    head = ["bench", "case", "metric", "megavl", "reference", "ratio", "goal", "met", "note"]
    lines = [f"Machine: {machine}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = f"{_fmt(r['reference'])} ({r['reference_name']})" if r["reference_name"] else _fmt(r["reference"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}x"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        cells = [r["bench"], r["case"], r["metric"], _fmt(r["megavl"]), ref, ratio, r["goal"] or "-", met, r["note"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def run(quick: bool, out: Path, device: torch.device | None = None, include_base: bool = False,
        only: list[str] | None = None) -> list[dict]:
    """Run the benchmarks (all, or the sections named in `only`), write bench.md and bench.json to
    `out`, and return the rows as dicts. A section that raises gives one FAILED row, not a lost table."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = machine_line(device)
    rows: list[dict] = []
    for name, section in _sections(include_base):
        if only and name not in only:
            continue
        print(f"[bench] {name} ...", flush=True)
        try:
            results = section(device, quick)
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            results = [Row(name, "-", "-", None, None, "", "", note=f"FAILED: {type(err).__name__}: {err}")]
        rows.extend(r.as_dict() for r in results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(markdown(rows, machine) + "\n")
    (out / "bench.json").write_text(json.dumps({"machine": machine, "quick": quick, "rows": rows}, indent=1))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench")
    parser.add_argument("--base", action="store_true", help="base-geometry framework overhead also on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU default: 1)")
    parser.add_argument("--only", nargs="*", default=None, help="section names to run (default: all)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = args.threads or (1 if device.type == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    rows = run(args.quick, args.out, device, include_base=args.base, only=args.only)
    print(markdown(rows, machine_line(device)))
    print(f"\nwritten: {args.out / 'bench.md'}, {args.out / 'bench.json'}")
    return 1 if any(r["note"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
