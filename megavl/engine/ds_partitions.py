"""Any range of a trained parameter's fp32 master and Adam moments, read straight from the per-rank
files DeepSpeed saved, with no conversion and no consolidation.

A resume on another world size (or ZeRO stage) needs on each rank only its new partition of each
parameter: about 12 B x P / W' bytes. DeepSpeed's files are torch zip archives whose tensors are
stored uncompressed, so `torch.load(mmap=True)` maps them and a slice reads only its own pages. A
saved rank's file is opened at most once per reading rank, and only once one of its ranges is needed.

Layouts (W = the saving world; r = a saving rank; names and shapes as DeepSpeed recorded them):
  ZeRO-3        `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`, one flat fp32 partition and
                Adam moments per sub-group. Parameter i of a sub-group (the ordered `param_shapes` in
                `zero_pp_rank_0_mp_rank_00_model_states.pt`) holds its elements [r*ps, (r+1)*ps),
                ps = ceil(numel / W), at offset sum(ps of the parameters before it); elements past
                numel are padding.
  ZeRO-1/2, bf16 the same file names; one flat partition per group of the concatenated parameters.
                `param_slice_mappings` gives each parameter's fragment (offset, size) in rank r's
                partition; one parameter's fragments follow each other in rank order.
  ZeRO-0 fp32   `mp_rank_00_model_states.pt`: the module's full tensors and torch AdamW's state.

What a file claims is checked before it is used (ranks 0..W-1 all present, the partition count is W,
every range lies inside its tensor, a parameter's fragments cover it exactly): a checkpoint that does
not add up raises CheckpointError naming the file, it is never read past.
DeepSpeed's files are DeepSpeed's pickles (loss scaler, enums, fragment addresses), read as
DeepSpeed's own loader reads them; the tensor bytes themselves are read by exact range
(`ranged_io.py`: the mapping only says where they lie).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .checkpoint import CheckpointError
from .ranged_io import RangedFile, file_mappings, mapped_offset

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
ZERO0_MODEL_STATES = "mp_rank_00_model_states.pt"


@dataclass
class ReadStats:
    """What a reader did: files opened, and tensor bytes copied out of them."""

    opens: int = 0
    bytes: int = 0
    files: list[str] = field(default_factory=list)


def _load_mapped(path: Path, stats: ReadStats) -> dict:
    stats.opens += 1
    stats.files.append(path.name)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # noqa: BLE001 - any failure to parse means the file cannot be used
        raise CheckpointError(f"{path.parent.name}: {path.name} is unreadable ({type(err).__name__}: {err})") from None


def _step_value(states: dict) -> int:
    """Adam's step from a torch optimizer state ({group or param index: {"step", ...}}); 0 before the
    first step."""
    step = next((s["step"] for s in states.values() if "step" in s), 0)
    return int(step.item() if torch.is_tensor(step) else step)


def optim_files(tag_dir: Path) -> list[Path]:
    """The saved ranks' optimizer files, by rank; raises unless ranks 0..W-1 are each there once."""
    by_rank: dict[int, Path] = {}
    for path in Path(tag_dir).iterdir():
        match = _OPTIM_FILE.match(path.name)
        if not match:
            continue
        if int(match.group(2)) != 0:
            raise CheckpointError(f"{Path(tag_dir).name}: {path.name} is a tensor-parallel file; megavl saves none")
        rank = int(match.group(1))
        if rank in by_rank:
            raise CheckpointError(f"{Path(tag_dir).name}: two optimizer files for rank {rank} "
                                  f"({by_rank[rank].name}, {path.name})")
        by_rank[rank] = path
    missing = sorted(set(range(max(by_rank, default=-1) + 1)) - set(by_rank))
    if not by_rank or missing:
        raise CheckpointError(f"{Path(tag_dir).name}: optimizer files of ranks {missing or [0]} are missing")
    return [by_rank[r] for r in range(len(by_rank))]


class SavedOptimizer:
    """Ranged reads of the fp32 master and Adam moments of every trained parameter, by name.

    `read(name, key, start, stop)`: elements [start, stop) of the flattened parameter `name` (key in
    KEYS), float32. `stats` counts the opens and bytes. Use as a context manager (or call close):
    the mapped files stay open while a load needs them."""

    def __init__(self, tag_dir: Path) -> None:
        self.tag_dir = Path(tag_dir)
        self.stats = ReadStats()
        self._open: dict[int, dict] = {}
        self._paths: dict[int, Path] = {}
        self._ranged: dict[int, RangedFile] = {}
        self._offsets: dict[tuple, int | None] = {}
        self._mappings: dict[int, list] = {}

    # -- what a layout provides
    def numel(self, name: str) -> int:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def _pieces(self, name: str, start: int, stop: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(saved rank, group, offset in that rank's flat group, lo, hi) for each saved run of
        elements [lo, hi) of `name` inside [start, stop), in order."""
        raise NotImplementedError

    def _tensor(self, state: dict, group: int, key: str) -> torch.Tensor:
        raise NotImplementedError

    def _file(self, rank: int) -> dict:
        raise NotImplementedError

    @property
    def step(self) -> int:
        raise NotImplementedError

    # -- shared
    @torch.no_grad()
    def read(self, name: str, key: str, start: int, stop: int) -> torch.Tensor:
        if not self.has(name):
            raise CheckpointError(f"{self.tag_dir.name}: parameter {name} is not in the saved optimizer state")
        numel = self.numel(name)
        if not 0 <= start <= stop <= numel:
            raise CheckpointError(f"{self.tag_dir.name}: elements [{start}, {stop}) of {name} asked, it has {numel}")
        out = torch.empty(stop - start, dtype=torch.float32)
        filled = start
        for rank, group, offset, lo, hi in self._pieces(name, start, stop):
            if lo != filled:
                raise CheckpointError(f"{self.tag_dir.name}: elements [{filled}, {lo}) of {name} are in no saved "
                                      f"partition")
            flat = self._tensor(self._file(rank), group, key)
            if offset < 0 or offset + (hi - lo) > flat.numel():
                raise CheckpointError(f"{self.tag_dir.name}: rank {rank}'s {key} of group {group} has "
                                      f"{flat.numel()} elements, {name} needs [{offset}, {offset + hi - lo})")
            self._copy(rank, (group, key), flat, offset, out[lo - start:hi - start])
            self.stats.bytes += (hi - lo) * flat.element_size()
            filled = hi
        if filled != stop:
            raise CheckpointError(f"{self.tag_dir.name}: elements [{filled}, {stop}) of {name} are in no saved partition")
        return out

    def _copy(self, rank: int, which: tuple, flat: torch.Tensor, offset: int, out: torch.Tensor) -> None:
        """out <- flat[offset:offset + len(out)], read from rank's file by exact range."""
        if (rank, which) not in self._offsets:
            if rank not in self._mappings:
                self._mappings[rank] = file_mappings(self._paths[rank])
            self._offsets[rank, which] = mapped_offset(flat, self._mappings[rank])
        base = self._offsets[rank, which]
        if base is None:  # where the mapping cannot be located: through the mapping
            out.copy_(flat.narrow(0, offset, out.numel()))
            return
        if rank not in self._ranged:
            self._ranged[rank] = RangedFile(self._paths[rank])
        part = torch.empty(out.numel(), dtype=flat.dtype)
        self._ranged[rank].read_into(base + offset * flat.element_size(), part)
        out.copy_(part)

    def close(self) -> None:
        for file in self._ranged.values():
            file.close()
        self._ranged.clear()
        self._open.clear()

    def __enter__(self) -> "SavedOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Zero3Partitions(SavedOptimizer):
    """ZeRO-3: the layout follows from the parameter shapes and W; rank r's file is opened only when
    a range inside its partitions is read."""

    def __init__(self, tag_dir: Path) -> None:
        super().__init__(tag_dir)
        self.files = optim_files(self.tag_dir)
        self.world = len(self.files)
        shapes = _load_mapped(self.tag_dir / ZERO3_MODEL_STATES, self.stats).get("param_shapes")
        if not isinstance(shapes, list):
            raise CheckpointError(f"{self.tag_dir.name}: {ZERO3_MODEL_STATES} has no param_shapes")
        # name -> (sub-group, offset in every rank's flat sub-group, elements per rank, numel)
        self.layout: dict[str, tuple[int, int, int, int]] = {}
        self.group_sizes = []
        for group, group_shapes in enumerate(shapes):
            offset = 0
            for name, shape in group_shapes.items():
                numel = math.prod(shape)
                per_rank = math.ceil(numel / self.world)
                self.layout[name] = (group, offset, per_rank, numel)
                offset += per_rank
            self.group_sizes.append(offset)

    def numel(self, name: str) -> int:
        return self.layout[name][3]

    def has(self, name: str) -> bool:
        return name in self.layout

    def _pieces(self, name, start, stop):
        group, offset, per_rank, _ = self.layout[name]
        if stop <= start:
            return
        for rank in range(start // per_rank, (stop - 1) // per_rank + 1):
            lo, hi = max(start, rank * per_rank), min(stop, (rank + 1) * per_rank)
            yield rank, group, offset + lo - rank * per_rank, lo, hi

    def _file(self, rank: int) -> dict:
        if rank not in self._open:
            path = self.files[rank]
            state = _load_mapped(path, self.stats).get("optimizer_state_dict")
            if not isinstance(state, dict) or "fp32_flat_groups" not in state:
                raise CheckpointError(f"{self.tag_dir.name}: {path.name} is not a ZeRO-3 optimizer partition")
            count = state.get("partition_count")
            counts = count if isinstance(count, (list, tuple)) else [count]
            if any(c != self.world for c in counts):
                raise CheckpointError(f"{self.tag_dir.name}: {path.name} was partitioned {count} ways, but "
                                      f"{self.world} ranks' files are there")
            flats = state["fp32_flat_groups"]
            for group, size in enumerate(self.group_sizes):
                if group >= len(flats) or flats[group].numel() < size:
                    raise CheckpointError(f"{self.tag_dir.name}: {path.name} holds fewer elements in group "
                                          f"{group} than the parameter shapes need ({size})")
            self._open[rank], self._paths[rank] = state, path
        return self._open[rank]

    def _tensor(self, state, group, key):
        if key == "fp32":
            return state["fp32_flat_groups"][group]
        return state["optimizer_state_dict"]["state"][group][key]

    @property
    def step(self) -> int:
        state = next(iter(self._open.values())) if self._open else self._file(0)
        return _step_value(state["optimizer_state_dict"]["state"])


class Zero12Partitions(SavedOptimizer):
    """ZeRO-1/2 and DeepSpeed's bf16 optimizer: where each fragment lies is in every rank's file,
    so each is opened (once) to learn it; only the ranges read are paged in."""

    def __init__(self, tag_dir: Path) -> None:
        super().__init__(tag_dir)
        self.files = optim_files(self.tag_dir)
        world = len(self.files)
        self.fragments: dict[str, list[tuple[int, int, int, int, int]]] = {}  # name -> (lo, hi, rank, group, offset)
        for rank, path in enumerate(self.files):
            state = _load_mapped(path, self.stats).get("optimizer_state_dict")
            if not isinstance(state, dict) or "param_slice_mappings" not in state:
                raise CheckpointError(f"{self.tag_dir.name}: {path.name} is not a ZeRO-1/2 optimizer partition")
            if state.get("partition_count", world) not in (world, [world] * len(state["param_slice_mappings"])):
                raise CheckpointError(f"{self.tag_dir.name}: {path.name} was partitioned "
                                      f"{state.get('partition_count')} ways, but {world} ranks' files are there")
            self._open[rank], self._paths[rank] = state, path
            for group, mappings in enumerate(state["param_slice_mappings"]):
                for name, address in mappings.items():
                    pieces = self.fragments.setdefault(name, [])
                    lo = pieces[-1][1] if pieces else 0
                    pieces.append((lo, lo + address.numel, rank, group, address.start))

    def numel(self, name: str) -> int:
        return self.fragments[name][-1][1]

    def has(self, name: str) -> bool:
        return name in self.fragments

    def _pieces(self, name, start, stop):
        for lo, hi, rank, group, offset in self.fragments[name]:
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                yield rank, group, offset + a - lo, a, b

    def _file(self, rank: int) -> dict:
        return self._open[rank]

    def _tensor(self, state, group, key):
        if key == "fp32":
            return state["single_partition_of_fp32_groups"][group]
        return state["base_optimizer_state"]["state"][group][key]

    @property
    def step(self) -> int:
        return _step_value(self._open[0]["base_optimizer_state"]["state"])


class Zero0Fp32(SavedOptimizer):
    """A ZeRO-0 fp32 checkpoint: one world-independent file with the full tensors."""

    def __init__(self, tag_dir: Path) -> None:
        super().__init__(tag_dir)
        path = self.tag_dir / ZERO0_MODEL_STATES
        if not path.is_file():
            raise CheckpointError(f"{self.tag_dir.name}: no DeepSpeed model states ({ZERO0_MODEL_STATES})")
        self._open[0] = state = _load_mapped(path, self.stats)
        self._paths[0] = path
        self.module, optim = state["module"], state["optimizer"]
        self.index: dict[str, dict] = {}
        for group in optim["param_groups"]:
            for index, name in zip(group["params"], group["names"]):
                self.index[name] = optim["state"].get(index, {})
        self._step = _step_value(optim["state"])

    def numel(self, name: str) -> int:
        return self.module[name].numel()

    def has(self, name: str) -> bool:
        return name in self.index and name in self.module

    def _pieces(self, name, start, stop):
        if start < stop:
            yield 0, 0, start, start, stop

    def _file(self, rank: int) -> dict:
        return self._open[rank]

    def _tensor(self, state, group, key):
        raise AssertionError("read() is overridden")

    def read(self, name: str, key: str, start: int, stop: int) -> torch.Tensor:
        if not self.has(name):
            raise CheckpointError(f"{self.tag_dir.name}: parameter {name} is not in the saved optimizer state")
        full = self.module[name] if key == "fp32" else self.index[name].get(key)
        if full is None:  # AdamW creates its moments at the first step
            return torch.zeros(stop - start, dtype=torch.float32)
        self.stats.bytes += (stop - start) * full.element_size()
        out = torch.empty(stop - start, dtype=full.dtype)
        self._copy(0, (name, key), full.reshape(-1), start, out)
        return out.float()

    @property
    def step(self) -> int:
        return self._step


def open_saved(tag_dir: Path) -> SavedOptimizer:
    """The reader for this tag's layout (ZeRO-3, ZeRO-1/2 / bf16, or ZeRO-0 fp32)."""
    tag_dir = Path(tag_dir)
    if (tag_dir / ZERO3_MODEL_STATES).is_file():
        return Zero3Partitions(tag_dir)
    if any(_OPTIM_FILE.match(p.name) for p in tag_dir.iterdir()):
        return Zero12Partitions(tag_dir)
    return Zero0Fp32(tag_dir)
