"""Nothing foreign is unpickled unless the user says so (engine/trust.py): a checkpoint directory
outside this run's checkpoints directory is refused before any of its files is opened by
torch.load, unless --trust-checkpoint; an export loads without unpickling. The foreign checkpoints
here hold a pickle that creates a file when it is loaded: the file tells whether it ran."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from megavl.config import ConfigError, load_config, to_dict
from megavl.engine.task_init import read_init
from megavl.engine.trust import UntrustedCheckpoint, refusal

REPO = Path(__file__).resolve().parents[3]


class _RunsCode:
    """Unpickled, it opens (creates) `path`: what a malicious pickle could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _config_yaml(folder: Path) -> None:
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(load_config(REPO / "configs/tiny.yaml"))))


def _zero0_checkpoint(ckpt_dir: Path, module: dict) -> Path:
    """A DeepSpeed ZeRO-0 fp32 tag as consolidated_state_dict reads it, with `latest` naming it."""
    tag = ckpt_dir / "step_00000002"
    tag.mkdir(parents=True)
    torch.save({"module": module}, tag / "mp_rank_00_model_states.pt")
    _config_yaml(tag)
    (ckpt_dir / "latest").write_text(tag.name)
    return tag


def test_init_from_a_foreign_checkpoint_is_refused_before_anything_is_unpickled(tmp_path):
    marker = tmp_path / "code_ran"
    tag = _zero0_checkpoint(tmp_path / "downloaded" / "checkpoints", {"w": torch.ones(2), "x": _RunsCode(marker)})
    own = tmp_path / "run" / "checkpoints"
    for path in (tag, tag.parent):  # a tag dir, or a checkpoints dir with `latest`
        with pytest.raises(UntrustedCheckpoint, match=r"task\.init_from=\S+/step_00000002: a checkpoint this run "
                                                      r"did not write; its mp_rank_00_model_states\.pt is a "
                                                      r"pickle.*--trust-checkpoint.*megavl-export"):
            read_init(str(path), own_checkpoints=own)
        assert not marker.exists()
    # the refusal is a bad configuration: train.py exits 2 with its one line
    assert issubclass(UntrustedCheckpoint, ConfigError)
    # --trust-checkpoint: it is unpickled (so the marker above proves nothing ran), and a file
    # that is not a state dict is a one-line error, not a traceback
    with pytest.raises(ConfigError, match="cannot read its weights"):
        read_init(str(tag), trust=True, own_checkpoints=own)
    assert marker.exists()


def test_a_raw_deepspeed_directory_without_config_is_refused_before_its_pickles(tmp_path):
    marker = tmp_path / "code_ran"
    tag = _zero0_checkpoint(tmp_path / "ds", {"x": _RunsCode(marker)})
    (tag / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="no config.yaml"):
        read_init(str(tag), trust=True)
    assert not marker.exists()


def test_this_runs_own_checkpoint_loads_without_trust_and_a_symlink_does_not_make_one_own(tmp_path):
    weights = {"student.w": torch.arange(4.0), "student.b": torch.ones(3)}
    own = tmp_path / "run" / "checkpoints"
    tag = _zero0_checkpoint(own, weights)
    state, saved = read_init(str(tag), own_checkpoints=own)
    assert saved == load_config(REPO / "configs/tiny.yaml").model
    for name, value in weights.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    assert refusal("", tag, own) is None
    foreign = _zero0_checkpoint(tmp_path / "elsewhere", weights)
    (own / "step_00000009").symlink_to(foreign, target_is_directory=True)
    assert refusal("", own / "step_00000009", own) is not None
    assert refusal("", tag, None) is not None  # megavl-evaluate has no checkpoints of its own


def test_an_export_loads_without_unpickling(tmp_path, monkeypatch):
    weights = {"w": torch.arange(4.0)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    _config_yaml(tmp_path)

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load called on an export")

    monkeypatch.setattr(torch, "load", no_pickles)
    state, _ = read_init(str(tmp_path))
    torch.testing.assert_close(state["w"], weights["w"], rtol=0, atol=0)
