"""The peak FLOP/s of a device no datasheet entry covers (a CPU, an unknown GPU), measured once.

A square matmul in the run's dtype, timed for about a second, best repetition: what this device, with
this many torch threads, reaches on the operation that dominates a transformer step. On a machine
shared with other work the probe can read low (then MFU reads high): delete the cache to measure again. The figure is kept
in a small JSON file per machine (`cache_path`), keyed by device name, dtype and thread count, so
only a machine's first run pays the probe's second or two.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PROBE_SIZE = {"cpu": 2048, "cuda": 8192}  # square matmul side: large enough to reach the plateau
PROBE_SECONDS = 1.0                         # time spent on timed repetitions (after one warm-up)
MIN_REPS = 3


def default_cache_path() -> Path:
    """$XDG_CACHE_HOME/megavl/peak_flops.json (~/.cache when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "megavl" / "peak_flops.json"


def device_name(device: torch.device) -> str:
    """The CUDA device name, or the CPU model (from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or device.type


def probe_key(device: torch.device, dtype: torch.dtype) -> str:
    return f"{device_name(device)} | {str(dtype).removeprefix('torch.')} | {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                         seconds: float = PROBE_SECONDS) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul in `dtype` on `device`: 2 n^3 / fastest repetition."""
    device = torch.device(device)
    n = size or PROBE_SIZE.get(device.type, PROBE_SIZE["cpu"])
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: allocator, kernel selection, thread pool
    _sync(device)
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < MIN_REPS or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n ** 3 / best


def _read(cache_path: Path) -> dict:
    try:
        data = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def probed_peak(device: torch.device, dtype: torch.dtype, cache_path: Path | None = None) -> tuple[float, str]:
    """(FLOP/s, key) for this device, dtype and thread count: from the cache, else measured and stored.

    An unreadable cache is measured over; an unwritable one is logged and the figure still returned."""
    device = torch.device(device)
    cache_path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = probe_key(device, dtype)
    entry = _read(cache_path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
        return float(entry["flops"]), key
    flops = measure_matmul_flops(device, dtype)
    data = _read(cache_path)
    data[key] = {"flops": flops, "matmul": PROBE_SIZE.get(device.type, PROBE_SIZE["cpu"]),
                 "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(cache_path)  # atomic: two runs starting together never leave half a file
    except OSError as exc:
        logger.warning("could not cache the matmul probe in %s (%s); the next run measures again", cache_path, exc)
    return flops, key
