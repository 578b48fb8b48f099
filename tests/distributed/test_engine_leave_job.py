"""How the ranks of a job leave (engine/launch.py: leave_job, train.py's last call), on 2 real gloo
ranks: they agree on one exit code and print a refusal once, also when only one rank refused; and a
rank that refused alone while its peer waits in a collective leaves after a bounded wait instead of
hanging, and neither rank aborts."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from launch_helpers import start_ranks

WORKER = Path(__file__).with_name("leave_job_worker.py")
REFUSAL = "megavl: cannot start: rank 1 cannot read its checkpoint"


def _leave(scenario: str) -> tuple[list[int], str, float]:
    start = time.monotonic()
    procs = start_ranks(2, [WORKER, scenario])
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenario}: a rank did not leave within 120 s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = "\n".join(logs)
    assert "terminate called" not in text and "Traceback" not in text, text[-4000:]
    return [p.returncode for p in procs], text, time.monotonic() - start


def test_one_rank_refusing_gives_every_rank_its_code_and_one_message():
    codes, text, _ = _leave("one_refuses")
    assert codes == [3, 3], text[-4000:]
    assert text.count(REFUSAL) == 1, text[-4000:]


def test_a_refusal_on_every_rank_is_printed_once():
    codes, text, _ = _leave("both_refuse")
    assert codes == [2, 2], text[-4000:]
    assert text.count("megavl: bad configuration: data.batch_size") == 1, text[-4000:]


def test_a_rank_refusing_alone_leaves_while_its_peer_waits_in_a_collective():
    codes, text, seconds = _leave("peer_blocked")
    assert codes == [1, 3], text[-4000:]  # rank 0's collective failed once its peer had left
    assert text.count(REFUSAL) == 1 and "rank 0 collective failed" in text, text[-4000:]
    assert seconds < 90, seconds
