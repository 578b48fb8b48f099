"""Ranged reads of saved partitions (engine/ds_partitions.py, engine/zero3_shards.py) on small layouts
written to disk as DeepSpeed lays out ZeRO-3 and ZeRO-1/2 optimizer files and as megavl writes the
ZeRO-3 teacher's shard files.

Every rank of every new world gets exactly its elements of every tensor; each saved file is opened at
most once per reading rank, and only when it holds some of them; a rank of the saving world opens its
own teacher shard file only; a layout that does not add up is refused with the file's name, never
read past. The real files and engines are covered end to end by tests/distributed/test_reshard_zero3.py
and tests/e2e/test_resume_world.py."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from deepspeed.utils.tensor_fragment import fragment_address
from safetensors.torch import save_file

from megavl.engine.checkpoint import CheckpointError
from megavl.engine.ds_partitions import KEYS, Zero3Partitions, Zero12Partitions, open_saved
from megavl.engine.zero3_shards import ShardFiles

SHAPES = OrderedDict([("a.weight", (5, 3)), ("a.bias", (5,)), ("temp", (1,)), ("b.weight", (4, 4))])


def _full(name: str, key: str) -> torch.Tensor:
    """A distinct value for every (parameter, state, element)."""
    base = list(SHAPES).index(name) * 1000 + KEYS.index(key) * 100
    return torch.arange(math.prod(SHAPES[name]), dtype=torch.float32) + base


def _write_zero3(tag, world: int) -> None:
    tag.mkdir(parents=True)
    for rank in range(world):
        flats = {}
        for key in KEYS:
            parts = []
            for name in SHAPES:
                full = _full(name, key)
                size = math.ceil(full.numel() / world)
                part = torch.zeros(size)
                mine = full[rank * size:(rank + 1) * size]
                part[:mine.numel()] = mine
                parts.append(part)
            flats[key] = torch.cat(parts)
        state = {"partition_count": world, "fp32_flat_groups": [flats["fp32"]],
                 "optimizer_state_dict": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": flats["exp_avg"],
                                                        "exp_avg_sq": flats["exp_avg_sq"]}}, "param_groups": []}}
        torch.save({"optimizer_state_dict": state}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    shapes = [OrderedDict((n, torch.Size(s)) for n, s in SHAPES.items())]
    torch.save({"param_shapes": shapes}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _write_zero12(tag, world: int) -> None:
    """One group: the parameters concatenated, padded to a multiple of the world, cut in W partitions."""
    tag.mkdir(parents=True)
    flat = {k: torch.cat([_full(n, k) for n in SHAPES]) for k in KEYS}
    total = flat["fp32"].numel()
    size = math.ceil(total / world)
    offsets, at = {}, 0
    for name in SHAPES:
        offsets[name] = (at, at + math.prod(SHAPES[name]))
        at = offsets[name][1]
    for rank in range(world):
        lo, hi = rank * size, min((rank + 1) * size, total)
        mappings = {name: fragment_address(numel=min(hi, b) - max(lo, a), start=max(lo, a) - lo)
                    for name, (a, b) in offsets.items() if max(lo, a) < min(hi, b)}
        part = {k: v[lo:hi].clone() for k, v in flat.items()}
        state = {"partition_count": world, "param_slice_mappings": [mappings],
                 "single_partition_of_fp32_groups": [part["fp32"]],
                 "base_optimizer_state": {"state": {0: {"step": 7, "exp_avg": part["exp_avg"],
                                                        "exp_avg_sq": part["exp_avg_sq"]}}, "param_groups": []}}
        torch.save({"optimizer_state_dict": state}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize("write,cls", [(_write_zero3, Zero3Partitions), (_write_zero12, Zero12Partitions)],
                         ids=["zero3", "zero12"])
@pytest.mark.parametrize("old_world", [1, 3, 4])
def test_every_rank_of_every_world_reads_its_partition_from_the_files_that_hold_it(tmp_path, write, cls, old_world):
    tag = tmp_path / "step_00000007"
    write(tag, old_world)
    for new_world in (1, 2, 4, 5):
        for rank in range(new_world):
            holders = set()  # the saving ranks whose ZeRO-3 partitions hold some of this rank's elements
            with open_saved(tag) as saved:
                assert isinstance(saved, cls)
                for name in SHAPES:
                    numel = math.prod(SHAPES[name])
                    size = math.ceil(numel / new_world)
                    start, stop = min(rank * size, numel), min((rank + 1) * size, numel)
                    old_size = math.ceil(numel / old_world)
                    if start < stop:
                        holders |= set(range(start // old_size, math.ceil(stop / old_size)))
                    for key in KEYS:
                        assert torch.equal(saved.read(name, key, start, stop), _full(name, key)[start:stop])
                assert saved.step == 7
                files = saved.stats.files
            assert len(files) == len(set(files)), f"a file opened twice: {files}"
            if cls is Zero3Partitions:  # the parameter shapes, then only the files that hold this rank's elements
                want = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in holders or {0}}
                assert set(files) == want | {"zero_pp_rank_0_mp_rank_00_model_states.pt"}, (new_world, rank)
            else:  # where the fragments lie is in every rank's file
                assert len(files) == old_world


def test_teacher_shards_open_each_file_once_and_the_saving_world_only_its_own(tmp_path):
    old_world = 4
    files = []
    for rank in range(old_world):
        tensors = {}
        for name in SHAPES:
            full = _full(name, "fp32")
            size = math.ceil(full.numel() / old_world)
            tensors[f"teacher/{name}"] = torch.cat([full, torch.zeros(size * old_world - full.numel())])[
                rank * size:(rank + 1) * size].clone()
        files.append(tmp_path / f"teacher_rank{rank}.safetensors")
        save_file(tensors, str(files[-1]))
    for new_world in (1, 2, 3, 4, 8):
        for rank in range(new_world):
            with ShardFiles(files, home=rank * old_world // new_world) as shards:
                for name in SHAPES:
                    full = _full(name, "fp32")
                    size = math.ceil(full.numel() / new_world)
                    start, stop = min(rank * size, full.numel()), min((rank + 1) * size, full.numel())
                    got = shards.read(f"teacher/{name}", start, stop, full.numel())
                    assert torch.equal(got, full[start:stop]), (new_world, rank, name)
                opened = shards.stats.files
            assert len(opened) == len(set(opened)), opened
            if new_world == old_world:
                assert opened == [f"teacher_rank{rank}.safetensors"]
            assert len(opened) <= math.ceil(old_world / new_world) + 1
        with ShardFiles(files) as shards:  # an unpartitioned teacher: every file, once
            for name in SHAPES:
                full = _full(name, "fp32")
                assert torch.equal(shards.read(f"teacher/{name}", 0, full.numel(), full.numel()), full)
            assert sorted(shards.stats.files) == sorted(f.name for f in files)


def test_a_layout_that_does_not_add_up_is_refused_naming_the_file(tmp_path):
    tag = tmp_path / "zero3"
    _write_zero3(tag, 2)
    bad = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(bad, weights_only=False)
    state["optimizer_state_dict"]["fp32_flat_groups"][0] = state["optimizer_state_dict"]["fp32_flat_groups"][0][:3]
    torch.save(state, bad)
    with open_saved(tag) as saved, pytest.raises(CheckpointError, match="zero_pp_rank_1.*fewer elements"):
        saved.read("b.weight", "fp32", 0, 16)

    state["optimizer_state_dict"]["fp32_flat_groups"][0] = torch.zeros(100)
    state["optimizer_state_dict"]["partition_count"] = 3
    torch.save(state, bad)
    with open_saved(tag) as saved, pytest.raises(CheckpointError, match="partitioned 3 ways, but 2"):
        saved.read("b.weight", "fp32", 0, 16)

    bad.unlink()  # a rank's file missing: refused before anything is read
    (tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"ranks \[1\] are missing"):
        open_saved(tag)

    tag12 = tmp_path / "zero12"
    _write_zero12(tag12, 3)
    (tag12 / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="zero_pp_rank_2_mp_rank_00_optim_states.pt is unreadable"):
        open_saved(tag12)
    good = tmp_path / "good"
    _write_zero3(good, 2)
    with open_saved(good) as saved:
        with pytest.raises(CheckpointError, match=r"elements \[0, 17\) of b.weight asked, it has 16"):
            saved.read("b.weight", "fp32", 0, 17)
        with pytest.raises(CheckpointError, match="c.weight is not in the saved optimizer state"):
            saved.read("c.weight", "fp32", 0, 1)
