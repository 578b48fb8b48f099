"""Bandwidth benchmark for megavl_kernels: each fused op vs the torch composite it replaces vs a copy.

    python bench/bench_kernels.py                       # CUDA if present, bf16, ViT shapes
    python bench/bench_kernels.py --device cpu --quick  # tiny shapes, reference timings

Bytes are the op's *unique* traffic: what it must read once and write once (a gathered pos row is
re-read from cache, so pos counts once as (N, D)). "copy" times ``dst.copy_(src)`` of exactly those
bytes (half read, half written), so ``fused/copy`` is the fraction of copy bandwidth the op gets
and ``speedup`` is composite time / fused time. On CUDA the L2 is flushed before every repetition so
small working sets are not served from cache. On CPU the fused column runs the dispatcher's
reference path (Triton is CUDA-only outside the interpreter), so the ratios there are ~1; on a
shared CPU set OMP_NUM_THREADS=1, or idle worker threads turn microseconds into milliseconds.

``run(device, dtype, shapes, quick) -> list[dict]`` is the importable entry point (bench/run_all.py).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from megavl_kernels import gather_tokens, masked_patch_targets, scatter_tokens
from megavl_kernels.backend import resolve_backend
from megavl_kernels.reference import masked_patch_targets_ref, scatter_tokens_ref

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """B images of N = (side/patch)^2 tokens of width D; K kept tokens (N - K masked)."""

    name: str
    B: int
    N: int
    D: int
    K: int
    patch: int = 16
    channels: int = 3


SHAPES = [
    Shape("vit_b16_224", B=256, N=196, D=768, K=49),   # the performance goal's shape
    Shape("vit_l16_224", B=128, N=196, D=1024, K=49),
    Shape("vit_b16_384", B=64, N=576, D=768, K=144),
]
QUICK_SHAPES = [Shape("tiny", B=4, N=196, D=96, K=49), Shape("tiny_odd_d", B=2, N=196, D=100, K=50)]


def time_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """fn()'s time in ms: CUDA, median of events with the L2 flushed before each repetition;
    CPU, the minimum (a shared CPU's noise only ever adds time)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return min(samples)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _cases(shape: Shape, device: torch.device, dtype: torch.dtype) -> list[tuple[str, Callable, Callable, int]]:
    """(op, fused, composite, unique bytes) for one shape."""
    B, N, D, K, p, C = shape.B, shape.N, shape.D, shape.K, shape.patch, shape.channels
    es = torch.tensor([], dtype=dtype).element_size()
    M = N - K
    side = int(round(N ** 0.5)) * p
    gen = torch.Generator(device="cpu").manual_seed(0)
    perm = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)]).to(device)
    keep_ids, masked_ids = perm[:, :K].contiguous(), perm[:, K:].contiguous()
    ids_restore = torch.argsort(perm, dim=1)
    x = torch.randn(B, N, D, device=device, dtype=dtype)
    pos = torch.randn(N, D, device=device, dtype=dtype)
    kept = torch.randn(B, K, D, device=device, dtype=dtype)
    mask_token = torch.randn(D, device=device, dtype=dtype)
    images = torch.randn(B, C, side, side, device=device, dtype=dtype)
    index = keep_ids.unsqueeze(-1).expand(-1, -1, D)
    ids_bytes = 8 * B * K
    return [
        ("gather_tokens", lambda: gather_tokens(x, keep_ids, check=False),
         lambda: torch.gather(x, 1, index), 2 * B * K * D * es + ids_bytes),
        ("gather_tokens+pos", lambda: gather_tokens(x, keep_ids, pos, check=False),
         lambda: torch.gather(x, 1, index) + pos[keep_ids], (2 * B * K * D + N * D) * es + ids_bytes),
        ("scatter_tokens", lambda: scatter_tokens(kept, ids_restore, mask_token, check=False),
         lambda: scatter_tokens_ref(kept, ids_restore, mask_token), (B * K * D + B * N * D + D) * es + 8 * B * N),
        ("masked_patch_targets", lambda: masked_patch_targets(images, masked_ids, p, check=False),
         lambda: masked_patch_targets_ref(images, masked_ids, p), 2 * B * M * p * p * C * es + 8 * B * M),
    ]


def run(device: str | torch.device = "cuda", dtype: str | torch.dtype = "bf16", shapes: list[Shape] | None = None,
        quick: bool = False) -> list[dict]:
    """Time every op at every shape; one dict per (shape, op) with ms, GB/s and ratios."""
    device = torch.device(device)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    shapes = shapes if shapes is not None else (QUICK_SHAPES if quick else SHAPES)
    reps, warmup = (10, 2) if quick else (50, 5)
    rows = []
    for shape in shapes:
        for op, fused, composite, nbytes in _cases(shape, device, dtype):
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            t_fused = time_ms(fused, device, reps, warmup)
            t_comp = time_ms(composite, device, reps, warmup)
            t_copy = time_ms(lambda: dst.copy_(src), device, reps, warmup)
            rows.append(dict(
                op=op, shape=shape.name, **{k: v for k, v in asdict(shape).items() if k != "name"},
                device=str(device), dtype=str(dtype).removeprefix("torch."),
                backend=resolve_backend(device), bytes=nbytes,
                fused_ms=t_fused, composite_ms=t_comp, copy_ms=t_copy,
                fused_gbps=nbytes / t_fused / 1e6, composite_gbps=nbytes / t_comp / 1e6,
                copy_gbps=nbytes / t_copy / 1e6,
                fused_vs_copy=t_copy / t_fused, speedup_vs_composite=t_comp / t_fused))
            del src, dst
    return rows


def format_table(rows: list[dict]) -> str:
    """One aligned text table of run()'s rows."""
    cols = [("op", "op", "{}"), ("shape", "shape", "{}"), ("backend", "backend", "{}"),
            ("fused_ms", "fused ms", "{:.3f}"), ("fused_gbps", "fused GB/s", "{:.1f}"),
            ("composite_ms", "composite ms", "{:.3f}"), ("composite_gbps", "composite GB/s", "{:.1f}"),
            ("copy_gbps", "copy GB/s", "{:.1f}"), ("fused_vs_copy", "fused/copy", "{:.2f}"),
            ("speedup_vs_composite", "speedup", "{:.2f}x")]
    cells = [[head for _, head, _ in cols]] + [[fmt.format(r[key]) for key, _, fmt in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = run(args.device, args.dtype, quick=args.quick)
    print(f"device={args.device} dtype={args.dtype}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
