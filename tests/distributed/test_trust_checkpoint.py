"""A foreign checkpoint on 2 gloo ranks (engine/trust.py): as task.init_from or --resume without
--trust-checkpoint it is refused on every rank before any rank unpickles it; with the flag rank 0
alone unpickles and merges it, and every rank gets the same weights (through a safetensors file
that is removed afterwards); megavl-evaluate refuses it with exit code 2. trust_worker.py says what each step does."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch_helpers import run_ranks

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("trust_worker.py")


def test_foreign_checkpoint_refused_on_every_rank_then_merged_by_rank0_alone(tmp_path):
    run_ranks(2, [WORKER, tmp_path], timeout=300, what="trust")
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in seen:
        assert "step_00000002: a checkpoint this run did not write" in rank["init_from_refused"]
        assert rank["init_from_refused"].startswith("task.init_from=")
        assert "--trust-checkpoint" in rank["resume_refused"]
        assert rank["unpickled_after_refusals"] == rank["unpickled_after_resume_refusal"] == []
        assert rank["unpickled_after_trusted_read"] == ["unpickled_by_rank0"]
        assert rank["scratch_left"] is False
        assert all(rank["equal"].values()), rank["equal"]
        assert rank["keys"] == ["student.a", "student.b", "student.probe", "student.tied"]
        assert rank["evaluate_code"] == 2 and rank["unpickled_by_evaluate"] == []
