"""Test-wide settings: no hub access, markers, and GPU skipping."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels can only run in the interpreter; deciding it before anything
# imports triton (timm does, through torchvision) lets the kernel tests run in this process.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason elsewhere")
    config.addinivalue_line("markers", "slow: takes more than a few seconds; still runs in CI")
    config.addinivalue_line("markers", "slurm: starts a real local Slurm cluster")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
