"""Every rank's rows on every rank, held once: each rank's block as it arrived, never concatenated.

Retrieval evaluation needs every image's and every caption's unimodal tokens on every rank for the
ITM re-rank (COCO-5k: 5,000 x 577 x 768 image tokens at 384 px ViT-B, 4.4 GB in bf16). An
all-gather into W padded buffers, then a concatenation, then a reordering by index holds three to
four copies at its peak. Here the owner of each block broadcasts it into a buffer of exactly its
size on the other ranks, and a (block, offset) table finds a row; the peak is one copy of the
gathered rows, plus each rank's own batches concatenated once before any other block arrives
(2/W of a copy).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RowBlocks:
    """Rows 0..N-1 of one or more row-aligned tensors, stored as blocks.

    `take(rows)` returns, for each tensor, its rows `rows` (a 1-D long tensor of row numbers) as one
    new tensor of len(rows) rows."""

    def __init__(self, blocks: list[tuple[torch.Tensor, ...]], block_of: torch.Tensor,
                 offset_of: torch.Tensor) -> None:
        self.blocks, self.block_of, self.offset_of = blocks, block_of, offset_of

    @classmethod
    def whole(cls, *tensors: torch.Tensor) -> "RowBlocks":
        """One block: the tensors as they are (a single process, or rows already gathered)."""
        n = tensors[0].shape[0]
        device = tensors[0].device
        return cls([tensors], torch.zeros(n, dtype=torch.long, device=device),
                   torch.arange(n, device=device))

    def __len__(self) -> int:
        return len(self.block_of)

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(self.blocks) == 1:
            return tuple(t[self.offset_of[rows]] for t in self.blocks[0])
        block, offset = self.block_of[rows], self.offset_of[rows]
        out = tuple(t.new_empty((len(rows), *t.shape[1:])) for t in self.blocks[0])
        for number in torch.unique(block).tolist():
            picked = torch.nonzero(block == number).flatten()
            for dst, src in zip(out, self.blocks[number]):
                dst[picked] = src[offset[picked]]
        return out


def gather_row_blocks(index: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, RowBlocks]:
    """(ascending unique global index over all ranks, RowBlocks of `tensors` in that order).

    `index` (n,) is the global index of this rank's rows of `tensors` (each (n, ...), contiguous; the
    trailing shape and dtype agree over the ranks). An index that several ranks hold is kept once,
    from the first of them in rank order. Every rank must call this at the same point."""
    rank, world = _rank_world()
    if world == 1:
        unique, inverse = torch.unique(index, return_inverse=True)
        first = _first_occurrence(inverse, len(unique), len(index))
        return unique, RowBlocks([tensors], torch.zeros_like(first), first)
    count = torch.tensor([len(index)], dtype=torch.long, device=index.device)
    counts_t = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts_t, count)
    counts = [int(c) for c in counts_t]
    padded = index.new_zeros(max(counts))
    padded[:len(index)] = index
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    all_index = torch.cat([p[:c] for p, c in zip(parts, counts)])
    unique, inverse = torch.unique(all_index, return_inverse=True)
    first = _first_occurrence(inverse, len(unique), len(all_index))
    ends = torch.tensor(counts, device=index.device).cumsum(0)
    block_of = torch.searchsorted(ends, first, right=True)
    offset_of = first - (ends - torch.tensor(counts, device=index.device))[block_of]
    blocks = []
    for source in range(world):
        if source == rank:
            block = tuple(t.contiguous() for t in tensors)
        else:
            block = tuple(t.new_empty((counts[source], *t.shape[1:])) for t in tensors)
        if counts[source] > 0:
            for t in block:
                dist.broadcast(t, src=source)
        blocks.append(block)
    return unique, RowBlocks(blocks, block_of, offset_of)


def _first_occurrence(inverse: torch.Tensor, num_unique: int, num_rows: int) -> torch.Tensor:
    """For each unique value, the first row that holds it."""
    first = torch.full((num_unique,), num_rows, dtype=torch.long, device=inverse.device)
    return first.scatter_reduce_(0, inverse, torch.arange(num_rows, device=inverse.device), reduce="amin")
