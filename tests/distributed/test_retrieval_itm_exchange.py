"""Retrieval fine-tuning's ITM moves only the picked negative rows (objectives.itm.itm_pairs, RowPlan)
instead of all-gathering every rank's token tensors with gradient, and its loss and gradients equal
the all-gather version it replaced (the reference in retrieval_itm_worker.py), on 2 real gloo ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch_helpers import run_ranks

WORKER = Path(__file__).with_name("retrieval_itm_worker.py")
B = 4  # the worker's local batch


@pytest.mark.slow
def test_retrieval_itm_row_exchange_equals_all_gather(tmp_path):
    world = 2
    run_ranks(world, [WORKER, tmp_path], timeout=300)
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert abs(res["loss"] - res["ref_loss"]) < 1e-12, (rank, res["loss"], res["ref_loss"])
        assert res["same_params"]
        assert res["grad_max_rel"] < 1e-10, (rank, res["grad_max_rel"])
        assert res["grad_norm"] > 0
        assert res["remote_negatives"] > 0, "no negative crossed ranks: the exchange went untested"
        received, sent, ref_received = res["received"], res["sent"], res["ref_received"]
        # No token tensor is all-gathered any more: the dense gathers carry only the ids, the two ITC
        # embeddings (for the draw, no gradient) and the picked ids; the picked remote rows move with
        # their gradients.
        assert "gather/grad" not in received and "gather/grad" in ref_received, received
        assert received["gather"] == (world - 1) * B * res["gathered_row_bytes"], (rank, received)
        assert received["itm/image_tokens"] == res["expected_image_received"], (rank, received)
        assert received.get("itm/text_tokens", 0) == res["expected_text_received"], (rank, received)
        assert sent["itm/image_tokens/grad"] == received["itm/image_tokens"]
        # At most B rows per tensor arrive, whatever the world size; the all-gather moved (W-1) B rows
        # forward and all-reduced the whole (W B) gathered tensor in backward.
        rows = res["row_bytes"]
        assert received["itm/image_tokens"] <= B * rows["img"]
        total = sum(received.values()) + sum(sent.values())
        ref_total = sum(ref_received.values()) + sum(res["ref_sent"].values())
        assert ref_total - total >= 2 * (world - 1) * B * rows["img"], (total, ref_total)
