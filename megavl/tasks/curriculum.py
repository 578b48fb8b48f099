"""SemVLP's curriculum: which fusion mode (single- or two-stream) a step runs in.

The mode is a pure function of (step, epoch) and the config, so every rank computes the same
mode without talking to the others, and a resumed run continues the same sequence.
The image/video modality of a step (mixed pre-training) is chosen the same way, by
megavl/data/modality.py's ModalitySchedule (a function of (data.seed, step)).
"""
from __future__ import annotations

from megavl.config import CurriculumConfig

MODE_IDS = {"single": 0, "two": 1}  # logged as curriculum/mode


def mode_at(step: int, epoch: int, cfg: CurriculumConfig) -> str:
    """epoch_modes, when set, picks the mode by epoch (cycled); otherwise the (mode, steps) cycle does.

    cycle [["single", 1], ["two", 1]] alternates every step; [["single", 100], ["two", 50]] runs
    100 single-stream steps, then 50 two-stream steps, and repeats.
    """
    if cfg.epoch_modes:
        return cfg.epoch_modes[epoch % len(cfg.epoch_modes)]
    period = sum(steps for _, steps in cfg.cycle)
    position = step % period
    for mode, steps in cfg.cycle:
        if position < steps:
            return mode
        position -= steps
    raise AssertionError("unreachable: position always falls inside the cycle")


def objectives_by_mode(cfg: CurriculumConfig) -> dict[str, list[str]]:
    return {"single": list(cfg.objectives_single), "two": list(cfg.objectives_two)}
