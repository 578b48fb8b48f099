"""Launch shapes for the row-copy kernels: one program per (block of rows, block of D).

A program moves a [ROWS, BLOCK_D] tile. BLOCK_D covers the width in one or a few power-of-two
blocks (768 -> 1024, with the tail masked: masked lanes issue no memory traffic) and ROWS grows
as D shrinks, so every program moves about ``TILE`` elements: enough bytes in flight per program to
keep HBM busy, few enough registers to keep occupancy. With D contiguous (stride 1, which Triton
specialises on) each thread's loads and stores vectorise to 16 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

TILE = 4096
MAX_BLOCK_D = 1024


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
    block_d = min(next_power_of_2(D), MAX_BLOCK_D)
    block_rows = max(1, TILE // block_d)
    grid = (-(-rows // block_rows), -(-D // block_d))
    return RowTiles(ROWS=block_rows, BLOCK_D=block_d, num_warps=4, grid=grid)
