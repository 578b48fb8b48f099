"""Retrieval fine-tuning in bf16 under ZeRO-1/2/3 on 2 CPU ranks, through the real Trainer and
DeepSpeed engines: the ITC temperature's bounds bind in the optimizer's fp32 master (a clamp of the
bf16 working copy alone is undone by the next step), and best/ holds the fp32 master weights,
gathered parameter by parameter, not the bf16 working copy."""
import json
from pathlib import Path

import pytest

from launch_helpers import run_ranks, synth_downstream

WORKER = Path(__file__).with_name("finetune_master_worker.py")
STAGES = (1, 2, 3)
TEMP_MIN, TEMP_MAX = 0.0695, 0.0705
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    out = tmp_path_factory.mktemp("finetune_master")
    synth = out / "synth"
    synth_downstream(synth, 16, 4)
    run_ranks(2, [WORKER, synth, out, *STAGES], timeout=900)
    return {s: [json.loads((out / f"stage{s}_rank{r}.json").read_text()) for r in range(2)] for s in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_temperature_bounds_bind_in_the_fp32_master(runs, stage):
    for seen in runs[stage]:
        assert seen["param_dtype"] == "torch.bfloat16"
        assert TEMP_MIN - 1e-7 <= seen["temp_master"] <= TEMP_MAX + 1e-7, seen
        if seen["temp_working"] is not None:  # a ZeRO-3 rank may hold no element of it
            assert TEMP_MIN - 5e-4 <= seen["temp_working"] <= TEMP_MAX + 5e-4, seen  # one bf16 spacing


@pytest.mark.parametrize("stage", STAGES)
def test_best_weights_are_the_fp32_master(runs, stage):
    seen = runs[stage][0]
    assert seen["best_step"] == 2
    assert seen["best_vs_master_max_abs"] == 0.0, seen
    assert seen["params_saved_as_bf16_rounding"] == 0, seen
    assert seen["params_differing_from_bf16"] > 0, seen  # the master is not bf16-representable
