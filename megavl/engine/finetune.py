"""The fine-tuning loop (task.name = retrieval | vqa | nlvr2) on the same DeepSpeed engine,
checkpoints, stop flag and TensorBoard monitor as pre-training.

Per step: the task's before_step(step) if it has one (retrieval's teacher EMA and distillation
alpha); the task module's forward(batch, generator) -> (total, losses); DeepSpeed backward/step.
A SIGTERM/SIGUSR1 is agreed by the ranks every run.stop_check_every steps, as in pre-training, and
ends the run after a checkpoint (no final evaluation).
Every run.eval_every steps and at the end: task.val (or VQA's held-out minival) is evaluated and the best weights by the
task's metric (r_mean / VQA overall / NLVR2 accuracy) are written as a megavl-export directory
`<output_dir>/best` (kept outside the pruned checkpoints). At the end task.test is evaluated too
(VQA: the server result file `<output_dir>/results/vqa_result_test.json`); metrics.json holds all.
Checkpoints: engine/checkpoint.py's format (completion marker, never-delete pruning, --fresh) with
{epoch, batch, best, task state} in meta.json; `--resume auto` continues at the exact batch (the training order is a function of
seed and epoch).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_file

from megavl.config import Config, to_dict
from megavl.data.text import build_tokenizer
from megavl.models.pretrained import without_init_files
from megavl.data.task_data import VIDEO_FILE_SKIP_REASONS
from megavl.tasks import nlvr2, retrieval, vqa
from megavl.tasks.base import load_backbone

from . import checkpoint
from .ds_config import build_ds_config, resolve_precision, zero_stage
from .launch import init_distributed
from .metrics import Monitor
from .optim import TEMPORAL_EMBED, build_optimizer, build_scheduler, group_lr, predates_temporal_group
from .stop import StopFlag
from .task_init import config_for_weights, read_init

log = logging.getLogger("megavl")
TASKS = {"retrieval": retrieval.build_parts, "vqa": vqa.build_parts, "nlvr2": nlvr2.build_parts}
IMAGE_SKIP_REASONS = ("missing_image_file", "empty_image", "corrupt_image", "too_many_pixels")
HEADS = ("head.", "temp", "student.fusion.", "student.itm_head.", "student.vision_proj.",
         "student.text_proj.")  # the fusion/head lr multiplier (SCL: x5)


def task_param_groups(module: torch.nn.Module, cfg) -> list[dict]:
    """AdamW groups: no decay for biases/norms/embeddings, fusion_lr_mult for fusion + heads,
    temporal_lr_mult for the temporal embedding (engine/optim.py says why)."""
    no_decay = {f"student.{n}" for n in module.student.no_weight_decay()} | {"temp"}
    groups: dict[tuple[bool, bool, bool], dict] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        key = (name in no_decay or p.ndim <= 1, name.startswith(HEADS), name == f"student.{TEMPORAL_EMBED}")
        group = groups.setdefault(key, {"params": [], "names": [],
                                        "weight_decay": 0.0 if key[0] else cfg.weight_decay,
                                        "lr": group_lr(cfg, *key[1:])})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _saved_task_state(ckpt_dir: Path, resume: str, fresh: bool) -> dict:
    """The task state (VQA answers) of the checkpoint a resume will load, read before building
    (every rank reads the same complete checkpoint's meta.json)."""
    if fresh or resume == "none":
        return {}
    choice = checkpoint.choose_checkpoint(ckpt_dir, resume) if resume != "auto" or checkpoint.tag_dirs(ckpt_dir) else None
    if not isinstance(choice, dict):
        return {}  # nothing to resume; an unusable directory is reported by _resume
    return checkpoint.read_meta(Path(choice["tag_dir"])).get("task_state", {})


class FineTuner:
    def __init__(self, cfg: Config, ds_config_path: str, resume: str = "auto",
                 stop: StopFlag | None = None, init: bool = True,
                 task_state: dict | None = None, fresh: bool = False) -> None:
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        torch.manual_seed(cfg.run.seed)
        self.output_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.precision = resolve_precision(cfg, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        resumed_state = task_state or _saved_task_state(self.ckpt_dir, resume, fresh)
        if init and cfg.task.init_from:  # weights from there: the init files are not read
            cfg = self.cfg = config_for_weights(cfg, cfg.task.init_from)
        build_cfg = cfg if init and not cfg.task.init_from else replace(cfg, model=without_init_files(cfg.model))
        self.parts = TASKS[cfg.task.name](build_cfg, self.tokenizer, self.device, self.dtype,
                                          **resumed_state)
        module = self.parts.module
        if init and cfg.task.init_from and not resumed_state:
            state, source_cfg = read_init(cfg.task.init_from)
            load_backbone(module.student, state, source_cfg, f"task.init_from={cfg.task.init_from}")
        ds_config = build_ds_config(ds_config_path, cfg, self.dist.world_size, self.device)
        optimizer = build_optimizer(task_param_groups(module, cfg.optim), cfg.optim, self.device)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.max_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.zero_stage = zero_stage(ds_config)
        self.module = self.engine.module
        self.loader = self.parts.train_loader
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best: dict = {}
        self._resume(resume, fresh)
        self.stop = stop or StopFlag()
        self.monitor = Monitor(self.output_dir, self.dist.is_main, cfg.run.max_steps, self.step)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # ------------------------------------------------------------------------ checkpoints
    def _resume(self, resume: str, fresh: bool) -> None:
        """As pre-training (engine/checkpoint.py): rank 0 picks the tag, every rank gets its choice or
        its error; old checkpoints are never deleted. Fine-tuning resumes on the same world size."""
        self.run_id = checkpoint.broadcast_from_rank0(checkpoint.new_run_id() if self.dist.is_main else None)
        if fresh and resume not in ("auto", "none"):
            raise checkpoint.CheckpointError(f"--fresh starts a new run; it cannot be combined with --resume {resume}")
        choice = checkpoint.choose_checkpoint(self.ckpt_dir, resume) if self.dist.is_main and not fresh else None
        choice = checkpoint.broadcast_from_rank0(choice)
        if isinstance(choice, str):
            raise checkpoint.CheckpointError(choice)
        if choice is None:
            return
        tag_dir = Path(choice["tag_dir"])
        meta = checkpoint.read_meta(tag_dir)
        if (meta["world_size"], meta["zero_stage"]) != (self.dist.world_size, self.zero_stage):
            raise checkpoint.CheckpointError(
                f"{tag_dir.name} was saved on {meta['world_size']} ranks with ZeRO-{meta['zero_stage']}; "
                f"fine-tuning resumes only on the same world size and stage (pre-training reshards)")
        if predates_temporal_group(meta.get("schedule", {}), self.module.student):
            raise checkpoint.CheckpointError(
                f"{tag_dir.name} predates the temporal embedding's own optimizer group (optim.temporal_lr_mult): "
                "its optimizer state does not fit; start the fine-tuning again from its task.init_from")
        path, _ = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        checkpoint.load_module_state(self.module, tag_dir, self.dist.rank, meta["world_size"])
        checkpoint.load_rng(tag_dir, self.dist.rank)
        self.step, self.epoch, self.batch_in_epoch = meta["step"], meta["epoch"], meta["batch"]
        self.best = meta["best"]
        self.run_id = meta["run_id"]
        log.info("resumed from %s at step %d", tag_dir, self.step)

    def save(self) -> None:
        meta = {"epoch": self.epoch, "batch": self.batch_in_epoch, "best": self.best,
                "task_state": self.parts.extra_state,
                "schedule": {"temporal_lr_mult": self.cfg.optim.temporal_lr_mult}}  # the optimizer group layout
        info = checkpoint.SaveInfo(run_id=self.run_id, world_size=self.dist.world_size, zero_stage=self.zero_stage,
                                   keep=self.cfg.run.keep_checkpoints,
                                   config_yaml=yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        checkpoint.save(self.engine, self.module, self.ckpt_dir, self.step, self.dist.rank, meta, info)

    def export_weights(self, out: Path) -> None:
        """The student's full weights as a megavl-export directory (a collective under ZeRO-3)."""
        skip = self.parts.training_only  # the teacher is not exported: not gathered either
        params = [p for name, p in self.module.named_parameters() if not name.startswith(skip)]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None,
                                               enabled=self.zero_stage == 3):
            if self.dist.is_main:
                full = {k: v.detach().float().contiguous().clone()
                        for k, v in self.module.state_dict().items()
                        if not k.startswith(skip)}  # no teacher, no queue
                out.mkdir(parents=True, exist_ok=True)
                # model.safetensors: the bare VLPModel (megavl.load_pretrained reads it); the task's
                # own weights (classifier, temperature) beside it for megavl-evaluate
                save_file({k[len("student."):]: v for k, v in full.items() if k.startswith("student.")},
                          str(out / "model.safetensors"))
                save_file({k: v for k, v in full.items() if not k.startswith("student.")},
                          str(out / "task_head.safetensors"))
                (out / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
                (out / "task_state.json").write_text(json.dumps(self.parts.extra_state))
        if dist.is_initialized():
            dist.barrier()

    # --------------------------------------------------------------------------- evaluate
    def evaluate(self, split: str) -> dict:
        metrics = self.parts.evaluate(split)
        self.monitor.scalars(self.step, {f"{split}/{k}": v for k, v in metrics.items()})
        self.monitor.message(f"step {self.step}: {self.cfg.task.name} {split} " +
                             " ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        return metrics

    def _evaluate_val(self) -> dict:
        metrics = self.evaluate("val")
        key = self.parts.best_metric
        if key in metrics and metrics[key] > self.best.get(key, float("-inf")):
            self.best = {**metrics, "step": self.step}
            self.export_weights(self.output_dir / "best")
        return metrics

    # ------------------------------------------------------------------------------- loop
    def _batches(self):
        while True:
            self.loader.set_epoch(self.epoch, self.batch_in_epoch)
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train(self) -> dict:
        from .trainer import _mean_over_ranks, _to_device, clear_zero3_grad_partitions, step_generator

        run = self.cfg.run
        results: dict = {"start_step": self.step, "step_losses": {}}
        batches = self._batches()
        preempted = False
        while self.step < run.max_steps:
            sums: dict[str, torch.Tensor] = {}
            step_scalars = self.parts.before_step(self.step) if self.parts.before_step else {}
            for micro in range(run.grad_accum):
                batch = _to_device(next(batches), self.device, self.dtype)
                total, losses = self.engine(batch, step_generator(run.seed, self.step, micro,
                                                                  self.device))
                self.engine.backward(total)
                self.engine.step()
                if micro == run.grad_accum - 1:  # stale ZeRO-3 gradient slots, as in pre-training
                    clear_zero3_grad_partitions(self.engine, self.zero_stage)
                for name, value in {"total": total, **losses}.items():
                    sums[name] = sums.get(name, 0) + value.detach() / run.grad_accum
            self.step += 1
            if self.step % run.log_every == 0 or self.step == run.max_steps:
                values = _mean_over_ranks(sums)
                results["step_losses"][self.step] = values
                skips = self._skips()
                self.monitor.scalars(self.step, {**{f"loss/{k}": v for k, v in values.items()},
                                                 "train/lr": self.scheduler.get_last_lr()[0],
                                                 **{f"train/{k}": v for k, v in step_scalars.items()},
                                                 **{f"data/skipped/{k}": n for k, n in skips.items()}})
                self.monitor.progress(self.step, {"loss": values["total"]})
            if run.eval_every > 0 and self.step % run.eval_every == 0 and self.step < run.max_steps \
                    and self._has_val():
                self._evaluate_val()
            stop = self.stop.agreed_at(self.step, run.stop_check_every, self.device)  # as pre-training
            if stop or self.step % run.checkpoint_every == 0 or self.step == run.max_steps:
                self.save()
            if stop:
                self.monitor.message(f"stop signal: checkpoint saved at step {self.step}; exiting")
                preempted = results["preempted"] = True
                break
        if not preempted and run.eval_every >= 0:
            results.update(self.final_evaluation())
        results["end_step"] = self.step
        self.monitor.close()
        return results

    def final_evaluation(self) -> dict:
        out: dict = {}
        if self._has_val():
            out["val"] = self._evaluate_val()
            out["best"] = self.best
        if self.cfg.task.test:
            out["test"] = self.evaluate("test")
            if self.parts.write_results:
                out["result_files"] = self.parts.write_results("test", str(self.output_dir / "results"))
        if self.dist.is_main:
            (self.output_dir / "metrics.json").write_text(json.dumps(out, indent=2))
        return out

    def _has_val(self) -> bool:
        return bool(self.cfg.task.val) if self.parts.has_val is None else self.parts.has_val

    def _skips(self) -> dict[str, int]:
        counts = self.loader.skip_counts()
        # a fixed list: every rank reduces the same vector
        reasons = IMAGE_SKIP_REASONS + tuple(r for r in VIDEO_FILE_SKIP_REASONS if r not in IMAGE_SKIP_REASONS)
        t = torch.tensor([float(counts.get(r, 0)) for r in reasons], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(t)
        return {r: int(v) for r, v in zip(reasons, t.tolist())}
