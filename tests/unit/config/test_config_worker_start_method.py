"""data.worker_start_method: empty (the platform's default) or a start method this platform has;
train.py makes it the process's, so every DataLoader of the run starts its workers that way."""
from __future__ import annotations

import multiprocessing

import pytest

from megavl.config import ConfigError, load_config


def test_default_is_the_platforms_and_every_available_method_is_accepted():
    assert load_config("configs/tiny.yaml").data.worker_start_method == ""
    for method in multiprocessing.get_all_start_methods():
        assert load_config("configs/tiny.yaml", [f"data.worker_start_method={method}"]).data.worker_start_method \
            == method


def test_an_unknown_method_names_the_key():
    with pytest.raises(ConfigError, match=r"^data\.worker_start_method: expected '' \(the platform's default\) or "
                                          r"one of .*spawn.*, got 'threads'$"):
        load_config("configs/tiny.yaml", ["data.worker_start_method=threads"])


def test_train_py_makes_it_the_process_start_method():
    import subprocess
    import sys

    code = ("import multiprocessing; from megavl.train import "
            "use_worker_start_method as use; use(''); a = multiprocessing.get_start_method(); use('spawn'); "
            "print(a, multiprocessing.get_start_method())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [multiprocessing.get_start_method(), "spawn"]
