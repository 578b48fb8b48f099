"""RowPlan's fixed splits are index arithmetic on the ids' device: building them reads no value on
the host (on an accelerator each read is a device-to-host copy that waits for the device), and,
simulated for every rank in one process, they route x_global[wanted[rank]] to every rank. The
exchange itself runs on real ranks in tests/distributed/test_row_exchange.py (with the same count)."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megavl.objectives.distributed import RowPlan

# Tensor calls that read values on the host (unique and nonzero size their output from the values).
HOST_READS = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero",
              "unique", "unique_consecutive", "masked_select"}


class _HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name == "__getitem__" and torch.is_tensor(args[1]) and args[1].dtype == torch.bool):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_fixed_plan_reads_nothing_on_the_host():
    wanted = torch.randint(0, 12, (3, 4))
    with _HostReads() as fixed:
        plan = RowPlan(wanted, 4, "fixed", rank=1, world=3)
    assert fixed.calls == []
    assert plan.take.shape == (4,) and plan.send_splits == plan.recv_splits == [4, 4, 4]
    with _HostReads() as exact:  # the variable splits must be read (and the counter sees it)
        RowPlan(wanted, 4, "exact", rank=1, world=3)
    assert exact.calls


@pytest.mark.parametrize("world,batch,rows", [(2, 3, 3), (3, 2, 5), (4, 3, 1)])
def test_fixed_slots_route_every_wanted_row(world, batch, rows):
    g = torch.Generator().manual_seed(world)
    x = [torch.randn(batch, 2, generator=g) for _ in range(world)]
    wanted = torch.randint(0, world * batch, (world, rows), generator=g)
    plans = [RowPlan(wanted, batch, "fixed", rank=r, world=world) for r in range(world)]
    slots = [x[q][plans[q].send_local].view(world, rows, 2) for q in range(world)]  # what rank q sends
    for d in range(world):
        received = torch.cat([slots[q][d] for q in range(world)])  # all_to_all: slot d of every rank
        assert torch.equal(received[plans[d].take], torch.cat(x)[wanted[d]])


def test_plan_rejects_bad_ids():
    with pytest.raises(RuntimeError, match=r"lie in \[0, 6\)"):
        RowPlan(torch.tensor([[0, 6], [1, 2]]), 3, "fixed", rank=0, world=2)
    with pytest.raises(ValueError, match="wanted must be"):
        RowPlan(torch.zeros(3, 2, dtype=torch.long), 3, "fixed", rank=0, world=2)
    with pytest.raises(ValueError, match="splits must be"):
        RowPlan(torch.zeros(2, 2, dtype=torch.long), 3, "padded", rank=0, world=2)
