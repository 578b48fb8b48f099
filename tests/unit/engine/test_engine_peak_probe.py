"""MFU on every device: the matmul probe's figure, its per-machine cache, and the datasheet first."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import megavl.engine.peak_probe as probe_mod
from megavl.engine.metrics import device_peak


def test_matmul_probe_measures_a_positive_rate():
    flops = probe_mod.measure_matmul_flops(torch.device("cpu"), torch.float32, size=64, seconds=0.01)
    assert 1e6 < flops < 1e15


@pytest.fixture
def fake_measure(monkeypatch):
    calls = []

    def measure(device, dtype, size=None, seconds=probe_mod.PROBE_SECONDS):
        calls.append(dtype)
        return 1e11 * len(calls)
    monkeypatch.setattr(probe_mod, "measure_matmul_flops", measure)
    return calls


def test_probe_is_cached_per_device_dtype_and_thread_count(tmp_path, fake_measure, monkeypatch):
    cache = tmp_path / "megavl" / "peak_flops.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert probe_mod.default_cache_path() == cache
    cpu = torch.device("cpu")
    flops, key = probe_mod.probed_peak(cpu, torch.float32)
    assert flops == 1e11 and fake_measure == [torch.float32]
    assert "float32" in key and f"{torch.get_num_threads()} threads" in key
    assert json.loads(cache.read_text())[key]["flops"] == 1e11
    assert probe_mod.probed_peak(cpu, torch.float32, cache) == (1e11, key)  # from the file: no probe
    assert len(fake_measure) == 1
    assert probe_mod.probed_peak(cpu, torch.bfloat16, cache)[0] == 2e11  # another dtype: measured
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert probe_mod.probed_peak(cpu, torch.float32, cache)[0] == 3e11  # another thread count too
    assert len(json.loads(cache.read_text())) == 3


def test_a_broken_or_unwritable_cache_still_gives_a_figure(tmp_path, fake_measure, caplog):
    cache = tmp_path / "peak.json"
    cache.write_text("{not json")
    assert probe_mod.probed_peak(torch.device("cpu"), torch.float32, cache)[0] == 1e11
    assert json.loads(cache.read_text())  # rewritten whole
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger=probe_mod.logger.name):
        assert probe_mod.probed_peak(torch.device("cpu"), torch.float32, blocked / "peak.json")[0] == 2e11
    assert "could not cache" in caplog.text


def test_device_peak_uses_the_datasheet_for_a_known_gpu_and_the_probe_elsewhere(tmp_path, fake_measure,
                                                                                 monkeypatch):
    cpu = device_peak("cpu", torch.float32, tmp_path / "p.json")
    assert cpu.probed and cpu.flops == 1e11 and "matmul probe" in cpu.detail
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    h100 = device_peak("cuda:0", torch.bfloat16, tmp_path / "p.json")
    assert not h100.probed and h100.flops == 989e12 and "H100" in h100.detail
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU 9000")
    unknown = device_peak("cuda:0", torch.bfloat16, tmp_path / "p.json")
    assert unknown.probed and "Some Future GPU 9000" in unknown.detail
