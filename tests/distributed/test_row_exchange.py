"""ITM's selected-row exchange (RowPlan) equals the dense gather_features + index, forward and
gradients, on 2 real gloo ranks; and it moves only the picked remote rows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch_helpers import run_ranks

WORKER = Path(__file__).with_name("row_exchange_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_row_exchange_equals_dense_gather(tmp_path, world):
    run_ranks(world, [WORKER, tmp_path], timeout=120)
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["forward"] == 0.0, (rank, res)
        assert res["grad"] < 1e-12, (rank, res)
        assert res["mask_equal"], (rank, res)
        assert res["received"] == res["expected_received"], (rank, res)  # unique remote rows only
        assert res["grad_sent"] == res["received"], (rank, res)
        assert res["grad_nonzero"] > 0
