"""The stop flag agreed every N steps and the step timer, on CPU."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist

from megavl.engine.metrics import StepTimer
from megavl.engine.stop import StopFlag


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_signal_stops_within_n_steps_with_one_all_reduce_per_n(gloo_world_of_one, monkeypatch):
    """A signal at any step leads to an agreed stop at the next multiple of N (<= N steps later), and
    the steps in between run no collective. Fails if the flag is agreed every step or never."""
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **kw: (calls.append(1), real(t, **kw))[1])
    every = 4
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        flag = StopFlag()
        for signalled_at in (1, 4, 7):
            flag.requested = False
            calls.clear()
            stopped_at = None
            for step in range(1, 20):
                if step == signalled_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if flag.agreed_at(step, every, torch.device("cpu")):
                    stopped_at = step
                    break
            assert stopped_at is not None and 0 <= stopped_at - signalled_at < every, (signalled_at, stopped_at)
            assert stopped_at % every == 0
            assert len(calls) == stopped_at // every  # one all-reduce per N steps, none in between
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    with pytest.raises(ValueError, match="every"):
        flag.agreed_at(1, 0, torch.device("cpu"))


def test_step_timer_host_time_on_cpu():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        timer.start_step()
        timer.next_batch(iter([0]))
        timer.step_done()
    assert timer.steps == 3 and not timer.on_device
    assert timer.seconds_per_step == pytest.approx(timer.total_s / 3)
    assert 0.0 <= timer.data_wait <= 1.0
    timer.reset()
    assert timer.steps == 0 and timer.seconds_per_step == 0.0


@pytest.mark.gpu
def test_step_timer_counts_device_time_not_host_time():
    """A step whose host part returns at once but whose GPU work takes long: the timer must report
    the GPU time (host time would be ~0 and inflate samples/s and MFU)."""
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    timer = StepTimer(device)
    torch.cuda.synchronize()
    timer.reset()
    timer.start_step()
    for _ in range(20):
        x = (x @ x).clamp_(-1, 1)
    host = timer.total_s
    timer.step_done()
    host_queued = timer.total_s - host
    device_s = timer.seconds_per_step
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        x = (x @ x).clamp_(-1, 1)
    end.record()
    end.synchronize()
    reference = start.elapsed_time(end) / 1e3
    assert device_s == pytest.approx(reference, rel=0.5)
    assert device_s > 2 * host_queued, (device_s, host_queued)
