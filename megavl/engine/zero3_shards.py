"""ZeRO-3 flat shards: which elements a rank's partition holds, and tensors saved as one safetensors
file of shards per saving rank, read by range.

DeepSpeed partitions each ZeRO-3 parameter of numel n into W shards of size ceil(n / W): rank r holds
elements [r * size, (r + 1) * size), the last ranks' shards padded with zeros past n. megavl saves the
EMA teacher (and its fp32 master) the same way, `teacher_rank{r}.safetensors` per rank, so a rank of
the same world reads exactly its own file, and a rank of another world the overlapping ranges of the
few files that hold its elements; each file is opened at most once.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, _partitioned, _teacher_params, _teachers
from .ds_partitions import ReadStats
from .ranged_io import SafetensorsRanges


def zero3_range(p: torch.nn.Parameter, rank: int) -> tuple[int, int, int]:
    """(start, stop, partition size): the elements of `p` this rank's ZeRO-3 partition holds; the
    partition is padded with zeros past stop."""
    size = p.ds_tensor.numel()
    start = min(rank * size, p.ds_numel)
    return start, min(start + size, p.ds_numel), size


def padded(values: torch.Tensor, size: int) -> torch.Tensor:
    """`values` followed by zeros up to `size` elements (DeepSpeed's partition padding)."""
    if values.numel() == size:
        return values
    out = torch.zeros(size, dtype=values.dtype)
    out[:values.numel()] = values
    return out


def regather_persistent(params: list[torch.nn.Parameter]) -> None:
    """ZeRO-3 parameters whose full copy stays gathered (numel <= the persistence threshold): rebuild
    that copy from the shards just written, as DeepSpeed does after each checkpoint (a collective;
    every rank passes the same parameters in the same order)."""
    persistent = [p for p in params if p.ds_numel > 0 and p.data.numel() == p.ds_numel]
    if persistent:
        persistent[0].partition(persistent)
        persistent[0].all_gather(persistent)


class ShardFiles:
    """Flat tensors saved as equal shards, files[r] holding rank r's: `read(key, start, stop, numel)`
    returns elements [start, stop) of the full tensor of `numel` elements, from the files that hold
    them. `home` is the file asked first for the keys and shard sizes (a rank's own, or the first it
    overlaps), so a rank of the saving world opens that one file only."""

    def __init__(self, files: list[Path], home: int = 0) -> None:
        self.files = [Path(f) for f in files]
        self.home = min(max(home, 0), len(self.files) - 1)
        self.stats = ReadStats()
        self._open: dict[int, object] = {}

    def _file(self, rank: int):
        if rank not in self._open:
            path = self.files[rank]
            self.stats.opens += 1
            self.stats.files.append(path.name)
            self._open[rank] = SafetensorsRanges(path)
        return self._open[rank]

    def keys(self) -> set[str]:
        return set(self._file(self.home).keys()) if self.files else set()

    def read(self, key: str, start: int, stop: int, numel: int) -> torch.Tensor:
        if start >= stop:  # a last rank's partition of a small tensor: padding only
            return torch.zeros(0)
        size = self._file(self.home).numel(key)
        if size * len(self.files) < numel:
            raise CheckpointError(f"{self.files[0].parent.parent.name}: {key} has {len(self.files)} shards of "
                                  f"{size}, fewer than its {numel} elements")
        pieces = []
        for rank in range(start // size, math.ceil(stop / size)):
            lo, hi = max(start, rank * size), min(stop, (rank + 1) * size)
            part = self._file(rank)
            if part.numel(key) != size:
                raise CheckpointError(f"{self.files[rank].parent.parent.name}: {self.files[rank].name} holds "
                                      f"{part.numel(key)} elements of {key}, the other shards {size}")
            pieces.append(part.read_range(key, lo - rank * size, hi - rank * size))
            self.stats.bytes += pieces[-1].numel() * pieces[-1].element_size()
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def __enter__(self) -> "ShardFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def load_teacher(module: torch.nn.Module, tag_dir: Path, rank: int, shared: dict[str, torch.Tensor],
                 shard_files: list[Path]) -> ReadStats:
    """The EMA teacher and its fp32 master from a checkpoint: full tensors from `shared` (rank 0's
    state file), ZeRO-3 shards from `shard_files` (one per saving rank) by range. A ZeRO-3 teacher
    here gets this rank's shard (persistent parameters then gather their full copy: a collective);
    an unpartitioned one the full tensors."""
    params = _teacher_params(module)
    world = dist.get_world_size() if dist.is_initialized() else 1
    with ShardFiles(shard_files, home=rank * len(shard_files) // world) as shards:
        shard_keys = shards.keys() if params and shard_files else set()

        saved = set(shared) | set(shard_keys)

        def value(kind: str, name: str, start: int, stop: int, numel: int) -> torch.Tensor:
            key = f"{kind}/{name}"
            if key not in saved:
                raise CheckpointError(f"{Path(tag_dir).name}: {key} is not in the checkpoint")
            if key in shared:
                return shared[key].flatten()[start:stop]
            return shards.read(key, start, stop, numel)

        def saved_name(name: str) -> str:
            """A second teacher (pre-training's ITC momentum model, `itc_teacher.`) missing from a
            checkpoint written with one teacher starts from that teacher: it filled the queue then."""
            prefix = next((p for p in prefixes if p and name.startswith(p)), "")
            if prefix and f"teacher/{name}" not in saved and f"teacher/{name[len(prefix):]}" in saved:
                return name[len(prefix):]
            return name

        prefixes = list(_teachers(module))
        master_keys = {k.removeprefix("master/") for k in saved if k.startswith("master/")}
        if not params:  # fine-tuning tasks other than retrieval have no teacher
            return shards.stats
        module.teacher_master.clear()
        for name, p in params.items():
            numel = p.ds_numel if _partitioned(p) else p.numel()
            shape = p.ds_shape if _partitioned(p) else p.shape
            start, stop, size = zero3_range(p, rank) if _partitioned(p) else (0, numel, numel)
            source = saved_name(name)
            mine = padded(value("teacher", source, start, stop, numel), size)
            if _partitioned(p):
                p.ds_tensor.data.copy_(mine.to(p.ds_tensor.dtype))
            else:
                p.data.copy_(mine.view(shape).to(p.dtype))
            device = p.ds_tensor.device if _partitioned(p) else p.device
            if source in master_keys:
                master = padded(value("master", source, start, stop, numel), size)
                module.teacher_master[name] = (master if _partitioned(p) else master.view(shape)).to(device).clone()
            if f"{source}/full" in master_keys and _partitioned(p) and p.data.numel() == numel:
                module.teacher_master[f"{name}/full"] = shared[f"master/{source}/full"].view(shape).to(device).clone()
        stats = shards.stats
    regather_persistent([p for p in params.values() if _partitioned(p)])
    return stats
