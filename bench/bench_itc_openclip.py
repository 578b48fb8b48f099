"""An ITC-only pre-training step against OpenCLIP's own training step on the same towers (one CPU process).

Three sides, timed in turn rep by rep (harness.interleaved_median), all fp32 on the same batch:
  openclip        OpenCLIP's step: its `ClipLoss` over the towers' normalised features, backward, torch
                  AdamW over the towers and projections, logit-scale clamp (open_clip_train/train.py);
                  the towers, projections and their initial weights are megavl's own, so the model
                  costs the same FLOPs on both sides.
  megavl-before   megavl's DeepSpeed (ZeRO-0) step as the Trainer ran it before the objective-aware
                  teacher and optim.skip_unused: every unused parameter got a zero gradient and AdamW
                  stepped it, and a full EMA teacher was updated after the step though nothing read it.
  megavl          the Trainer's step now: no teacher (ITC without a queue reads none), unused
                  parameters skipped.

    PYTHONPATH=.:kernels:<dir with open_clip> python bench/bench_itc_openclip.py [--size 4m] [--reps 5]

Writes benchmarks/itc_openclip_cpu2core_<yyyymm>.md (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, interleaved_median, machine_line, synthetic_batch  # noqa: E402

from megavl.config import load_config  # noqa: E402
from megavl.engine.launch import init_distributed  # noqa: E402
from megavl.engine.step import build_engine, step_generator, zero_fill_unused_grads  # noqa: E402
from megavl.engine.unused import UnusedParameters  # noqa: E402
from megavl.objectives.teacher import ema_update_, make_teacher  # noqa: E402
from megavl.tasks.pretrain import pretrain_params  # noqa: E402
from megavl.tasks.pretrain_flops import step_flops  # noqa: E402

ITC_ONLY = ["objectives.itm.weight=0", "objectives.mlm.weight=0", "objectives.mim_pixel.weight=0",
            "objectives.mim_sem.weight=0", "objectives.scl.weight=0", "objectives.itc.queue_size=0",
            "run.max_steps=1000", "optim.warmup_steps=10", "run.global_batch_size=0", "run.grad_accum=1"]
SIZES = {"4m": ("configs/pretrain_4m.yaml", ["model.vision.init=", "model.text.hf_path="]),
         "tiny": ("configs/tiny.yaml", [])}


class Towers(torch.nn.Module):
    """megavl's towers and projections with OpenCLIP's model surface: features and logit scale."""

    def __init__(self, student, temp: float) -> None:
        super().__init__()
        self.vision, self.text = student.vision, student.text
        self.vision_proj, self.text_proj = student.vision_proj, student.text_proj
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.0 / temp).log())

    def forward(self, images, ids, mask) -> dict:
        return {"image_features": F.normalize(self.vision_proj(self.vision(images)[:, 0]), dim=-1),
                "text_features": F.normalize(self.text_proj(self.text(ids, mask)[:, 0]), dim=-1),
                "logit_scale": self.logit_scale.exp()}


def openclip_side(cfg, student_state: dict, batch: dict):
    from open_clip.loss import ClipLoss
    from megavl.models.vlp import VLPModel

    student = VLPModel(cfg.model)
    student.load_state_dict(student_state)
    model = Towers(student, cfg.objectives.itc.temp_init)
    # open_clip_train/main.py: no weight decay on gains, biases, logit_scale
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": cfg.optim.weight_decay}],
                            lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    loss_fn = ClipLoss()

    def step() -> None:  # open_clip_train/train.py train_one_epoch, one batch, no accumulation
        opt.zero_grad()
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        loss_fn(**out).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    return step


def megavl_side(cfg, before: bool, batch: dict, student_state: dict):
    engine, scheduler, stage = build_engine(cfg, str(REPO / "ds_configs/zero0.json"), 1, torch.device("cpu"))
    module = engine.module
    module.student.load_state_dict(student_state)
    trained = pretrain_params(module)
    teacher = make_teacher(module.student) if before else None
    unused = None if before else UnusedParameters.for_engine(trained.named, engine, stage, scheduler.optimizer)
    state = {"step": 0}

    def step() -> None:  # engine/trainer.py's loop, one micro-batch
        i = state["step"]
        total, _ = engine(batch, mode="single", generator=step_generator(0, i, 0, torch.device("cpu")))
        engine.backward(total)
        if before:
            zero_fill_unused_grads(trained, stage)
        else:
            unused.before_step(i)
        engine.step()
        module.clamp_temperature()
        if before:
            ema_update_(teacher, module.student, 0.996, master={})
        else:
            unused.after_step()
            module.update_teachers(i, cfg.run.max_steps)
        state["step"] += 1
    return step, module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="4m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-len", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29633"}.items():
        os.environ.setdefault(key, value)  # a bench process is a world of one
    init_distributed()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    recipe, extra = SIZES[args.size]
    cfg = load_config(str(REPO / recipe), [*extra, *ITC_ONLY, f"data.batch_size={args.batch}",
                                           f"data.max_text_len={args.text_len}"])
    batch = synthetic_batch(cfg, args.batch, args.text_len, torch.device("cpu"))
    torch.manual_seed(0)
    from megavl.models.vlp import VLPModel
    student_state = {k: v.clone() for k, v in VLPModel(cfg.model).state_dict().items()}
    after, module = megavl_side(cfg, False, batch, student_state)
    sides = {"openclip": openclip_side(cfg, student_state, batch),
             "megavl-before": megavl_side(cfg, True, batch, student_state)[0], "megavl": after}
    times = interleaved_median(sides, torch.device("cpu"), args.reps, warmup=2)
    flops = step_flops(cfg.model, cfg.objectives, module.active("single"), "single", args.batch, args.text_len, 0)
    trained = sum(p.numel() for _, p in pretrain_params(module).named)
    teachers = sum(p.numel() for t in module.ema_teachers().values() for p in t.parameters())
    ratio = {k: v / times["openclip"] for k, v in times.items()}
    cmd = "PYTHONPATH=.:kernels:<open_clip dir> python bench/bench_itc_openclip.py " + " ".join(argv or sys.argv[1:])
    lines = [f"# ITC-only step against OpenCLIP's step, same towers ({datetime.date.today():%Y-%m-%d})", "",
             f"Hardware: {machine_line(torch.device('cpu'))}; torch threads {torch.get_num_threads()}", "",
             f"Command: `{cmd}`", "",
             f"Model: {args.size} towers ({recipe}: ViT {cfg.model.vision.width}x{cfg.model.vision.depth} at "
             f"{cfg.model.vision.img_size} px, text {cfg.model.text.width}x{cfg.model.text.depth}), micro-batch "
             f"{args.batch}, text length {args.text_len}, fp32, one process (DeepSpeed ZeRO-0), median of "
             f"{args.reps} interleaved reps after 2 warm-up steps each.", "",
             "| side | s/step | vs OpenCLIP | goal |", "|---|---|---|---|"]
    for name in ("openclip", "megavl-before", "megavl"):
        goal = "<= 1.02x" if name == "megavl" else ""
        lines.append(f"| {name} | {times[name]:.3f} | {ratio[name]:.3f}x | {goal} |")
    lines += ["", f"megavl now: {trained / 1e6:.1f}M parameters stepped at most (the student's unused ones skipped), "
              f"{teachers / 1e6:.1f}M teacher parameters held; analytic step FLOPs {flops.total / 1e9:.1f} GFLOP "
              f"(tests/unit/engine/test_flops.py checks the count equal to FlopCounterMode for ITC alone)."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out or REPO / f"benchmarks/itc_openclip_cpu2core_{datetime.date.today():%Y%m}.md")
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
