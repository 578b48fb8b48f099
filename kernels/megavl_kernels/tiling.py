"""Launch shapes for the row-copy kernels: one program per (block of rows, block of D).

A program moves a [ROWS, BLOCK_D] tile. BLOCK_D is the largest power of two (MIN..MAX_BLOCK_D)
whose blocks pad D by at most 1/8 (768 -> 3 x 256, not 1 x 1024 with a quarter of the threads idle;
1024 -> 1024; 3000 -> 3 x 1024), else the least-padding one (96 -> 128), and ROWS grows as BLOCK_D shrinks so every
program moves about ``TILE`` elements: enough bytes in flight per program to keep HBM busy, few
enough registers to keep occupancy. With D contiguous (stride 1, which Triton specialises on)
each thread's loads and stores vectorise to 16 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

TILE = 4096
MAX_BLOCK_D = 1024
MIN_BLOCK_D = 64  # below this a row segment is under two 32-byte sectors (bf16)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class RowTiles:
    """Grid and tile sizes for ``rows`` rows of width ``D``."""

    ROWS: int
    BLOCK_D: int
    num_warps: int
    grid: tuple[int, int]


def row_tiles(rows: int, D: int) -> RowTiles:
    """Tile sizes and grid for a kernel that moves ``rows`` rows of ``D`` elements."""
    top = min(next_power_of_2(D), MAX_BLOCK_D)
    candidates = [top >> s for s in range(top.bit_length()) if (top >> s) >= min(MIN_BLOCK_D, top)]
    padding = {b: -(-D // b) * b - D for b in candidates}
    small_enough = [b for b in candidates if 8 * padding[b] <= D]
    block_d = small_enough[0] if small_enough else min(candidates, key=lambda b: (padding[b], -b))
    block_rows = max(1, TILE // block_d)
    grid = (-(-rows // block_rows), -(-D // block_d))
    return RowTiles(ROWS=block_rows, BLOCK_D=block_d, num_warps=4, grid=grid)
