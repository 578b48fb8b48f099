"""Checks of the benchmark programs themselves (not of megavl): the harness produces every row, and
the GPU bring-up script's CPU dry run goes through every stage. `make test` runs them after tests/,
so a benchmark that no longer runs fails CI; tests/ imports nothing from bench/."""
import os
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))  # the bench modules import each other by name (harness, bench_*)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels can only run in the interpreter, decided before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; still runs in CI")
