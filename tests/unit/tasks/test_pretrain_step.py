"""The whole pre-training step on a tiny model: every objective produces a finite loss, gradients reach
every trained parameter, and 50 optimizer steps on fixed data lower the total loss."""
import pytest
import torch

from megavl.config import OBJECTIVE_NAMES, load_config
from megavl.engine.optim import build_optimizer, param_groups
from megavl.tasks.pretrain import PretrainModule, pretrain_params


def _batch(B=8, L=16, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 1100, (B, L), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(L)[None] < torch.randint(6, L + 1, (B,), generator=g)[:, None]).long()
    picked = (torch.rand(B, L, generator=g) < 0.3) & mask.bool()
    picked[:, 0] = False
    return {"images": torch.randn(B, 3, size, size, generator=g), "input_ids": ids * mask, "attention_mask": mask,
            "mlm_input_ids": torch.where(picked, torch.full_like(ids, 103), ids * mask),
            "mlm_labels": torch.where(picked, ids, torch.full_like(ids, -100)), "image_ids": torch.arange(B)}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", ["data.max_text_len=16", "optim.lr=1e-3"])
    module = PretrainModule(cfg.model, cfg.objectives, {"single": list(OBJECTIVE_NAMES), "two": list(OBJECTIVE_NAMES)})
    return cfg, module


@pytest.mark.parametrize("mode", ["single", "two"])
def test_every_objective_runs_and_every_parameter_learns(setup, mode):
    cfg, module = setup
    total, losses = module(_batch(), mode, torch.Generator().manual_seed(0))
    assert sorted(losses) == sorted(OBJECTIVE_NAMES)
    assert all(torch.isfinite(v) for v in losses.values())
    expected = sum(getattr(cfg.objectives, n).weight * v for n, v in losses.items())
    torch.testing.assert_close(total, expected)
    total.backward()
    unused = {"two": set(), "single": {"cross."}}[mode]  # single-stream steps unplug the cross-attention
    missing = [n for n, p in module.student_parameters()
               if p.grad is None and not any(u in n for u in unused)]
    assert not missing, missing
    assert all(p.grad is None for p in module.teacher.parameters())


def test_disabled_objectives_do_not_run(setup):
    cfg, _ = setup
    cfg.objectives.mim_sem.weight = 0.0
    cfg.objectives.itm.weight = 0.0
    module = PretrainModule(cfg.model, cfg.objectives, {"single": ["itc", "mlm"], "two": list(OBJECTIVE_NAMES)})
    _, single = module(_batch(), "single")
    _, two = module(_batch(), "two", torch.Generator().manual_seed(0))
    assert sorted(single) == ["itc", "mlm"]
    assert sorted(two) == ["itc", "mim_pixel", "mlm", "scl"]


@pytest.mark.slow
def test_total_loss_falls_over_50_steps_on_fixed_data(setup):
    cfg, module = setup
    torch.set_num_threads(1)
    optimizer = build_optimizer(param_groups(pretrain_params(module), cfg.optim), cfg.optim, torch.device("cpu"))
    batch, history = _batch(), []
    for step in range(50):
        total, _ = module(batch, ("single", "two")[step % 2], torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        module.update_teachers(step, 50)
        history.append(total.item())
    first, last = sum(history[:4]) / 4, sum(history[-4:]) / 4
    assert last < 0.8 * first, (first, last)
