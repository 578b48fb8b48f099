"""EMA teacher update: the grouped torch._foreach_* update (`teacher.ema_update_`) vs a per-tensor
Python loop (`ema_update_loop_`, the unit test's reference in tests/unit/objectives/teacher_reference.py),
both on the same modules, interleaved.

Geometries: the 4M recipe's student (ViT-B/16 + BERT-base + the fusion encoder and heads: about 800
tensors, where a per-tensor loop's Python overhead shows) and the tiny recipe's. fp32 on CPU; with
bf16 (GPU) the teacher follows fp32 master copies in both versions.

    python bench/bench_ema.py
"""
from __future__ import annotations

import sys

import torch

from megavl.config import load_config
from megavl.models.vlp import VLPModel
from megavl.objectives.teacher import ema_update_, make_teacher

from harness import RECIPES, REPO, Row, interleaved_median

sys.path.insert(0, str(REPO / "tests/unit/objectives"))
from teacher_reference import ema_update_loop_  # noqa: E402


def measure(recipe: str, device: torch.device, reps: int) -> tuple[float, float, int, int]:
    """(foreach s, loop s, tensors, parameters) per update of one teacher/student pair."""
    cfg = load_config(RECIPES[recipe], [])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = VLPModel(cfg.model).to(device, dtype)
    teacher = make_teacher(student)
    master_a, master_b = {}, {}
    times = interleaved_median({"foreach": lambda: ema_update_(teacher, student, 0.996, master=master_a),
                                "loop": lambda: ema_update_loop_(teacher, student, 0.996, master=master_b)},
                               device, reps=reps, warmup=1)
    tensors = sum(1 for _ in student.parameters())
    params = sum(p.numel() for p in student.parameters())
    return times["foreach"], times["loop"], tensors, params


def rows(device: torch.device, quick: bool) -> list[Row]:
    out = []
    for recipe, name in (("tiny", "tiny"), ("4m", "ViT-B/16 + BERT-base (4M recipe)")):
        if quick and recipe == "4m":
            continue
        fast, slow, tensors, params = measure(recipe, device, reps=3 if quick else 7)
        dtype = "bf16 + fp32 masters" if device.type == "cuda" else "fp32"
        out.append(Row("EMA teacher", f"{name}: {tensors} tensors, {params / 1e6:.0f}M params", "ms per update",
                       fast * 1e3, slow * 1e3, "per-tensor loop", "", note=f"{device.type}, {dtype}; median"))
    return out


if __name__ == "__main__":
    for row in rows(torch.device("cuda" if torch.cuda.is_available() else "cpu"), quick=False):
        print(row.as_dict())
