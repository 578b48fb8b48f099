"""DataLoader workers and the stop signals (Slurm sends them to every process of a job step): a
spawned worker imports for seconds before its init function can ignore them, and the helper
processes of spawn and forkserver (multiprocessing's resource tracker, the fork server) never do.
start_workers starts all of them with the signals blocked: SIGTERM and SIGUSR1 sent to each of them
at once change nothing, the batches still come and the helpers live on; so do helpers that
start_worker_helpers started before a library's multiprocessing lock (tqdm's) could start them.

Each case runs in a fresh interpreter: the helpers are per process, and one started earlier by
another test (without the signals blocked) would die of the signal."""
from __future__ import annotations

import subprocess
import sys

import pytest

from launch_helpers import REPO

SCRIPT = """
import multiprocessing, os, signal, sys
from multiprocessing import forkserver, resource_tracker
import torch
from torch.utils.data import DataLoader, Dataset
from megavl.data.loader import STOP_SIGNALS, _ignore_stop_signals, start_worker_helpers, start_workers

class Numbers(Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, index):
        return torch.tensor(index)

if __name__ == "__main__":
    for sig in STOP_SIGNALS:  # this process is the trainer: it handles the signals itself
        signal.signal(sig, lambda *_: None)
    multiprocessing.set_start_method(sys.argv[1])
    if sys.argv[2] == "early":  # as train.py: the helpers first, then a library's lock (tqdm's)
        start_worker_helpers()
        lock = multiprocessing.RLock()
    loader = DataLoader(Numbers(), batch_size=2, num_workers=2, worker_init_fn=_ignore_stop_signals,
                        multiprocessing_context=multiprocessing.get_context(sys.argv[1]))
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    batches = start_workers(loader)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before, "the trainer's mask is restored"
    helpers = [resource_tracker._resource_tracker._pid]
    if sys.argv[1] == "forkserver":
        helpers.append(forkserver._forkserver._forkserver_pid)
    for pid in [w.pid for w in batches._workers] + helpers:  # the workers are still starting
        for sig in STOP_SIGNALS:
            os.kill(pid, sig)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3]]
    for pid in helpers:
        os.kill(pid, 0)  # alive
    print("ok")
"""


@pytest.mark.parametrize("method,helpers", [("spawn", "with_loader"), ("forkserver", "with_loader"),
                                            ("spawn", "early")])
def test_stop_signals_while_workers_and_helpers_start_kill_none_of_them(method, helpers, tmp_path):
    script = tmp_path / "start_workers.py"  # a file: spawned workers import the dataset class from it
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), method, helpers], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1:] == ["ok"], done.stdout[-2000:] + done.stderr[-4000:]
