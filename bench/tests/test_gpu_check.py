"""bench/gpu_check.sh cannot rot: its CPU dry run goes through every stage (install check, the GPU-only
test selection, the GPU bench sections at smoke size, the summary), and the summary never reports a
failed or missing stage as a pass."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpu_summary  # bench/, on sys.path through conftest.py

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_goes_through_every_stage(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "bench/gpu_check.sh"), str(out), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    assert [s["stage"] for s in summary["stages"]] == ["install", "gpu_tests", "sync_debug", "bench"]
    names = [t["name"] for t in summary["tests"]["tests"]]
    assert any("test_kernels" in n for n in names) and any("flash" in n for n in names), names
    assert any("bf16_step_through_flash_has_no_host_sync" in n for n in names), names
    assert {r["bench"] for r in summary["bench"]["rows"]} == {"attention", "end to end"}
    md = (out / "summary.md").read_text()
    assert "## GPU-only tests" in md and "## Benchmark rows" in md and "Overall: PASS" in md
    assert "torch" in (out / "log.txt").read_text()


def test_summary_fails_on_a_failed_test_or_a_missing_stage(tmp_path):
    (tmp_path / "stages.txt").write_text("install 0 0\ngpu_tests 1 12\n")
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.unit.test_kernels" name="test_a" time="1.5">'
        '<failure message="AssertionError: 3 != 4">trace</failure></testcase>'
        '<testcase classname="tests.unit.test_kernels" name="test_b" time="0.1"/></testsuite></testsuites>')
    (tmp_path / "sync_debug.xml").write_text('<testsuites><testsuite></testsuite></testsuites>')
    summary = gpu_summary.summarise(tmp_path, dry_run=False)
    assert not summary["ok"]
    assert summary["tests"]["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 0}
    assert summary["stages"][1]["result"] == "failed"
    assert "no bench.json" in gpu_summary.markdown(summary)
    assert gpu_summary.main([str(tmp_path)]) == 1 and (tmp_path / "summary.md").is_file()
    (tmp_path / "stages.txt").write_text("install 0 0\ngpu_tests 0 12\nbench 124 270\n")
    assert gpu_summary.summarise(tmp_path, dry_run=False)["stages"][2]["result"] == "timed out"
