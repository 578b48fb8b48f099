"""bench/run_all.py in its tiny mode produces every row of the table, with both sides, the ratio and
the goal; speed is not checked (CI machines are shared). The ratio and goal logic is checked on
hand-made rows."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
EXPECTED_BENCHES = ["masked encoding", "framework overhead", "ZeRO-3 memory", "checkpoint", "FLOP accounting",
                    "data", "video decoding", "kernels", "attention", "end to end", "retrieval eval",
                    "ITM negatives", "EMA teacher", "ZeRO-3 curriculum", "video retrieval", "finetune"]
FIELDS = {"bench", "case", "metric", "megavl", "reference", "reference_name", "ratio", "goal", "met", "note"}


def _load_run_all():
    spec = importlib.util.spec_from_file_location("megavl_bench_run_all", BENCH / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_goal_and_ratio_of_a_row():
    from harness import Row

    assert Row("b", "c", "ms", 3.0, 10.0, "ref", "<= 0.35x").met is True
    assert Row("b", "c", "ms", 4.0, 10.0, "ref", "<= 0.35x").met is False
    assert Row("b", "c", "flops", 1.04, 1.0, "ref", "within 5%").met is True
    assert Row("b", "c", "flops", 0.94, 1.0, "ref", "within 5%").met is False
    skipped = Row("b", "c", "ms", None, None, "ref", "<= 1.05x", note="skipped")
    assert skipped.ratio is None and skipped.met is None
    assert Row("b", "c", "ms", 2.0, 4.0, "ref", "").as_dict()["ratio"] == pytest.approx(0.5)
    zero = Row("b", "c", "R@1", 3.0, 0.0, "ref", ">= 1.5x")  # a reference that scored 0
    assert zero.ratio is None and zero.met is None


@pytest.mark.slow
def test_quick_harness_produces_every_row(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _load_run_all().run(quick=True, out=tmp_path)
    finally:
        torch.set_num_threads(threads)
        if torch.distributed.is_initialized():  # in-process bench sections start a world of one
            torch.distributed.destroy_process_group()

    failed = [r["note"] for r in rows if r["note"].startswith("FAILED")]
    assert not failed, failed
    assert sorted({r["bench"] for r in rows}) == sorted(EXPECTED_BENCHES)
    for row in rows:
        assert FIELDS <= set(row), row
    cuda = torch.cuda.is_available()
    for row in rows:
        skipped = row["note"].startswith("skipped")
        if skipped:
            assert row["megavl"] is None and row["ratio"] is None, row
            continue
        if row["bench"] == "end to end":  # a figure with no reference side
            assert row["megavl"] is not None, row
            continue
        assert row["megavl"] is not None and row["reference"] is not None, row
        assert row["reference_name"], row
        if row["reference"] == 0:  # a tiny run can score 0 on the reference side: no ratio, not a crash
            assert row["ratio"] is None and row["met"] is None, row
        else:
            assert row["ratio"] == pytest.approx(row["megavl"] / row["reference"]), row
    by_bench = {b: [r for r in rows if r["bench"] == b] for b in EXPECTED_BENCHES}
    for bench in ("masked encoding", "framework overhead", "ZeRO-3 memory", "FLOP accounting", "attention"):
        assert all(r["goal"] for r in by_bench[bench]), bench
    assert len(by_bench["ZeRO-3 memory"]) == 4  # parameters, gradients, optimizer state, total
    assert len(by_bench["FLOP accounting"]) == 2  # single and two mode
    assert [r["met"] for r in by_bench["FLOP accounting"]] == [True, True]
    assert any(r["note"].startswith("skipped") for r in by_bench["end to end"]) != cuda

    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == rows and saved["quick"] is True and "torch" in saved["machine"]
    table = (tmp_path / "bench.md").read_text()
    assert table.startswith("Machine: ") and table.count("\n| ") == len(rows) + 1
