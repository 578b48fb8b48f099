"""The pre-training loop: build, resume, step, log, evaluate, checkpoint, stop cleanly on a signal.

Every rank runs the same sequence of collectives (forward passes under ZeRO-3, metric reductions,
evaluation, checkpoints) at the same steps; decisions that could differ between ranks (a signal that
reached one rank only) are agreed by an all-reduce first.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml

from megavl.config import Config, to_dict
from megavl.data import SKIP_REASONS, build_eval_loader, build_train_loader
from megavl.data.modality import MODALITIES, MODALITY_IDS, check_clip_model
from megavl.tasks.pretrain import PretrainModule
from megavl.objectives.teacher import teacher_momentum
from megavl.tasks.base import load_backbone

from . import checkpoint, reshard
from .curriculum import MODE_IDS, mode_at, objectives_by_mode
from .ds_compat import check_engine
from .ds_config import build_ds_config, resolve_precision, zero_stage
from .evaluate import eval_fusion_mode, evaluate_retrieval
from .flops import mfu, peak_flops, step_flops
from .launch import DistInfo, init_distributed
from .stop import StopFlag
from .task_init import read_init
from .metrics import Monitor, StepTimer, peak_memory_gb
from .optim import build_optimizer, build_scheduler, param_groups, predates_temporal_group
from .visuals import log_mask_images

log = logging.getLogger("megavl")


def step_generator(seed: int, step: int, micro: int, device: torch.device) -> torch.Generator:
    """Masks and ITM negatives of a step are a pure function of (seed, step, micro), the same on every
    rank (each draws for the global batch and keeps its rows): a resumed run draws the same ones
    without saving generator state, and the draws do not depend on the world size."""
    digest = hashlib.sha256(f"{seed}/{step}/{micro}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    if "mlm_labels" in batch:  # counted on the host: the MLM head's selection then needs no device sync
        out["mlm_count"] = int((batch["mlm_labels"] != -100).sum())
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            out[key] = value.to(dtype) if value.is_floating_point() else value
            if key == "images" and value.is_floating_point() and value.dtype != dtype:
                out["images_fp32"] = value  # MIM pixel targets come from the full-precision pixels
        else:
            out[key] = value
    return out


def _mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    names = sorted(values)
    if not names:
        return {}
    stacked = torch.stack([values[n].detach().float() for n in names])
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


def _sum_skips(counts: dict[str, int], device: torch.device) -> dict[str, int]:
    reasons = list(SKIP_REASONS)
    t = torch.tensor([float(counts.get(r, 0)) for r in reasons], device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return {r: int(v) for r, v in zip(reasons, t.tolist())}


def _share_cpu_threads(device: torch.device) -> None:
    """On CPU, ranks on one machine share its cores: without this each rank starts one thread per
    core and they thrash. An explicit OMP_NUM_THREADS wins."""
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "0")) or 0)
    if local_world <= 0:
        local_world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))


def build_engine(cfg: Config, ds_config_path: str, world_size: int, device: torch.device, init: bool = True):
    """The DeepSpeed engine around a fresh PretrainModule (call after init_distributed and seeding);
    init: load task.init_from's weights first (a new run, not a resumed one).

    Returns (engine, lr_scheduler, zero_stage)."""
    module = PretrainModule(cfg.model, cfg.objectives, objectives_by_mode(cfg.curriculum))
    if init and cfg.task.init_from:
        init_pretraining(module, cfg.task.init_from)
    ds_config = build_ds_config(ds_config_path, cfg, world_size, device)
    optimizer = build_optimizer(param_groups(module, cfg.optim), cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.run.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
    check_engine(engine, zero_stage(ds_config))  # every private hook used below exists, or a clear error
    if world_size == 1 and zero_stage(ds_config) == 0:
        # DeepSpeed flattens, "all-reduces" over one rank and unflattens every gradient each step.
        engine.enable_backward_allreduce = False
    return engine, scheduler, zero_stage(ds_config)


def init_pretraining(module: PretrainModule, path: str) -> None:
    """Continued pre-training (e.g. image-text weights -> video-text): student and teacher start
    from a megavl export or checkpoint (tasks/base.load_backbone: same architecture, resolution and
    frames may differ). A resumed run's checkpoint then replaces them as usual."""
    state, source_cfg = read_init(path)
    load_backbone(module.student, state, source_cfg, f"task.init_from={path}")
    module.teacher.load_state_dict(module.student.state_dict())
    log.info("pre-training starts from %s", path)


def zero_fill_unused_grads(module: PretrainModule, zero_stage: int) -> None:
    """Give parameters that this step did not use (cross-attention in a single-stream step) a zero
    gradient under ZeRO-0, as ZeRO 1-3 do with their flat gradient buffers: AdamW then applies their
    momentum and weight decay in every stage alike, instead of skipping them only in stage 0."""
    if zero_stage != 0:
        return
    for _, p in module.student_parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def clear_zero3_grad_partitions(engine, zero_stage: int) -> None:
    """After a ZeRO-3 optimizer step, zero its flat gradient-partition buffer.

    DeepSpeed 0.19 builds each step's gradients from that buffer for EVERY parameter, and only
    overwrites the slots of parameters that received a gradient: a parameter unused in a step (the
    cross-attention sublayer in a single-stream step) would be updated again with its stale gradient
    from the last step that used it. Found by tests/distributed/test_sharded_equals_unsharded.py.

    With CPU offload of the optimizer (ds_configs/zero3_offload.json) the step reads its gradients
    from a second, persistent buffer: each fp32 partition's `.grad` (on the CPU), into which DeepSpeed
    copies only the parameters reduced in this step, so it is zeroed too. Left stale, an uninterrupted
    run re-applied the cross-attention's old gradient while a resumed one (fresh, zero buffer) did not:
    losses 3e-4 apart one step after a resume. Found by tests/distributed/test_reshard_zero3.py.
    """
    if zero_stage != 3:
        return
    opt = engine.optimizer
    opt.grad_partitions_flat_buffer.zero_()  # presence checked by ds_compat.check_engine
    if getattr(opt, "offload_optimizer", False):
        for flat in opt.fp32_partitioned_groups_flat:
            if flat.grad is not None:  # None for an NVMe-swapped sub-group: swapped back in at the next step
                flat.grad.zero_()


class Trainer:
    def __init__(self, cfg: Config, ds_config_path: str, resume: str = "auto", stop: StopFlag | None = None,
                 fresh: bool = False) -> None:
        self.cfg = cfg
        self.dist: DistInfo = init_distributed()
        self.device = self.dist.device
        _share_cpu_threads(self.device)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.output_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.precision = resolve_precision(cfg, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32

        choice = self._choose_checkpoint(resume, fresh)
        # task.init_from starts a new run only: a resumed one takes its weights from the checkpoint
        self.engine, self.scheduler, self.zero_stage = build_engine(cfg, ds_config_path, self.dist.world_size,
                                                                    self.device, init=choice is None)
        self.module: PretrainModule = self.engine.module

        masking = cfg.objectives.masking
        self.loader = build_train_loader(cfg.data, rank=self.dist.rank, world_size=self.dist.world_size,
                                         mlm_prob=masking.text_mask_prob,
                                         scl_mask_prob=cfg.objectives.scl.text_mask_prob,
                                         global_batch_size=cfg.run.global_batch_size
                                         or cfg.data.batch_size * cfg.run.grad_accum * self.dist.world_size)
        check_clip_model(self.loader.modalities, cfg.data.num_frames, cfg.model.vision.num_frames)
        self.step = 0
        self._grad_norm_fallback: float | None = None
        self._resume(choice, fresh)
        self.stop = stop or StopFlag()
        self.monitor = Monitor(self.output_dir, self.dist.is_main, cfg.run.max_steps, self.step)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    # ------------------------------------------------------------------------------ resume
    def _choose_checkpoint(self, resume: str, fresh: bool) -> dict | None:
        """The checkpoint to resume from, or None for a new run. Rank 0 lists the directory and picks
        the tag; every rank gets its choice (or its error)."""
        if fresh and resume not in ("auto", "none"):
            raise checkpoint.CheckpointError(f"--fresh starts a new run; it cannot be combined with --resume {resume}")
        choice = checkpoint.choose_checkpoint(self.ckpt_dir, resume) if self.dist.is_main and not fresh else None
        choice = checkpoint.broadcast_from_rank0(choice)
        if isinstance(choice, str):  # rank 0's error, raised on every rank alike
            raise checkpoint.CheckpointError(choice)
        return choice

    def _resume(self, choice: dict | None, fresh: bool) -> None:
        """Continue from the chosen checkpoint (any world size, any ZeRO stage), or start a new run."""
        self.run_id = checkpoint.broadcast_from_rank0(checkpoint.new_run_id() if self.dist.is_main else None)
        # The recipe's (lr, weight decay) per group, read from the fresh optimizer before any load
        # (param_groups() cannot be re-run after ZeRO-3 has partitioned the parameters).
        self._recipe_groups = [(g["initial_lr"], g["weight_decay"]) for g in self.scheduler.optimizer.param_groups]
        if choice is None:
            if fresh:
                log.info("--fresh: new run %s at step 0; checkpoints already in %s are kept", self.run_id,
                         self.ckpt_dir)
            return
        tag_dir = Path(choice["tag_dir"])
        meta = checkpoint.read_meta(tag_dir)
        old_world, old_stage = meta["world_size"], meta["zero_stage"]
        if predates_temporal_group(meta.get("schedule", {}), self.module.student):
            # DeepSpeed pairs optimizer groups by position, which this split would misalign
            log.warning("%s predates the temporal embedding's own optimizer group: loading it by name; the "
                        "table trains at optim.temporal_lr_mult=%s from here", tag_dir.name, self.cfg.optim.temporal_lr_mult)
            reshard.load(self.engine, self.module, tag_dir, self.dist.rank, self.zero_stage)
        elif reshard.needs_reshard(tag_dir, old_world, old_stage, self.dist.world_size, self.zero_stage):
            log.info("resuming %s saved on %d ranks (ZeRO-%d) on %d ranks (ZeRO-%d): resharding", tag_dir.name,
                     old_world, old_stage, self.dist.world_size, self.zero_stage)
            reshard.load(self.engine, self.module, tag_dir, self.dist.rank, self.zero_stage)
        else:
            path, _ = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise checkpoint.CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        checkpoint.load_module_state(self.module, tag_dir, self.dist.rank, old_world)
        if not checkpoint.load_rng(tag_dir, self.dist.rank):
            torch.manual_seed(self.cfg.run.seed + 1_000_003 * self.dist.rank + meta["step"])
        self.step = meta["step"]
        self.run_id = meta["run_id"]  # a resumed run keeps its id: it may prune its own older tags
        self.engine.global_steps = self.step
        self.engine.global_samples = self.step * self.engine.train_batch_size()
        self._apply_schedule(meta.get("schedule", {}))
        self.loader.load_state_dict(meta["data"])
        log.info("resumed from %s at step %d (run %s)", tag_dir, self.step, self.run_id)

    def _schedule_settings(self) -> dict:
        o = self.cfg.optim
        return {"lr": o.lr, "warmup_steps": o.warmup_steps, "schedule": o.schedule, "min_lr_ratio": o.min_lr_ratio,
                "fusion_lr_mult": o.fusion_lr_mult, "temporal_lr_mult": o.temporal_lr_mult,
                "weight_decay": o.weight_decay,
                "max_steps": self.cfg.run.max_steps}

    def _apply_schedule(self, saved: dict) -> None:
        """The recipe's schedule at the resumed step, for every group: base lr x multiplier, weight
        decay, warm-up, decay over run.max_steps (the teacher momentum follows the same max_steps).

        DeepSpeed restores the old base rates (and ZeRO-3's universal path would copy group 0's to
        all); a changed optim.lr / warm-up / run.max_steps would then be half applied."""
        current = self._schedule_settings()
        changed = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
        if changed:
            log.warning("schedule changed since the checkpoint, applying the new one from step %d: %s", self.step,
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        groups = self.scheduler.optimizer.param_groups  # the torch AdamW that DeepSpeed steps
        for group, (lr, weight_decay) in zip(groups, self._recipe_groups, strict=True):
            group["initial_lr"], group["weight_decay"] = lr, weight_decay
        self.scheduler.base_lrs = [lr for lr, _ in self._recipe_groups]
        self.scheduler.last_epoch = self.step - 1
        self.scheduler.step()  # last_epoch = step: each group's lr = base x lr_factor(step)

    def save(self) -> None:
        meta = {"data": self.loader.state_dict(), "schedule": self._schedule_settings()}
        info = checkpoint.SaveInfo(run_id=self.run_id, world_size=self.dist.world_size, zero_stage=self.zero_stage,
                                   keep=self.cfg.run.keep_checkpoints,
                                   config_yaml=yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        checkpoint.save(self.engine, self.module, self.ckpt_dir, self.step, self.dist.rank, meta, info)

    # -------------------------------------------------------------------------------- eval
    def evaluate(self) -> dict[str, float] | None:
        """Retrieval on the val shards, each rank embedding its share (see tasks/pretrain_eval.py)."""
        if not self.cfg.data.val_shards:
            return None
        run = self.cfg.run
        loader = build_eval_loader(self.cfg.data, rank=self.dist.rank, world_size=self.dist.world_size)
        mode = eval_fusion_mode(run.eval_mode, self.cfg.model.fusion.cross_attention, self.cfg.curriculum)
        metrics = evaluate_retrieval(self.module.student, loader, self.device, self.dtype,
                                     itm_rerank_k=run.eval_itm_rerank_k, mode=mode, rerank=run.eval_rerank,
                                     pair_batch=run.eval_pair_batch)
        self.monitor.scalars(self.step, {f"eval/{d}_r{k}": metrics[f"{d}_r{k}"]
                                         for d in ("i2t", "t2i") for k in (1, 5, 10)})
        self.monitor.scalars(self.step, {"eval/r_mean": metrics["r_mean"]})
        chance = 1.0 / metrics["num_texts"]
        self.monitor.message(f"step {self.step}: retrieval i2t R@1 {metrics['i2t_r1']:.3f} "
                             f"t2i R@1 {metrics['t2i_r1']:.3f} (chance {chance:.4f}, "
                             f"{int(metrics['num_images'])} images, ITM re-rank k={run.eval_itm_rerank_k} "
                             f"in {mode}-stream mode)")
        return metrics

    # -------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        cfg, run = self.cfg, self.cfg.run
        results: dict = {"start_step": self.step, "step_losses": {}}
        if self.step == 0 and run.eval_every >= 0:  # "before" figure for the retrieval gain
            results["eval_before"] = self.evaluate()
        data_iter = iter(self.loader)
        timer = StepTimer(self.device)  # device time on CUDA: honest samples/s and MFU
        while self.step < run.max_steps:
            mode = mode_at(self.step, self.loader.epoch, cfg.curriculum)
            modality = self.loader.modality_at(self.step)  # every rank alike (data/modality.py)
            losses_sum: dict[str, torch.Tensor] = {}
            timer.start_step()
            for micro in range(run.grad_accum):
                host_batch = timer.next_batch(data_iter)
                if run.log_sample_keys:
                    self._log_sample_keys(micro, modality, host_batch["keys"])
                batch = _to_device(host_batch, self.device, self.dtype)
                gen = step_generator(run.seed, self.step, micro, self.device)
                total, losses = self.engine(batch, mode, gen)
                self.engine.backward(total)
                if micro == run.grad_accum - 1:
                    zero_fill_unused_grads(self.module, self.zero_stage)
                    if self._logs_at(self.step + 1):
                        self._grad_norm_fallback = self._plain_grad_norm()
                self.engine.step()
                self.module.clamp_temperature()  # the optimizer's fp32 master too, not just the module's copy
                if micro == run.grad_accum - 1:
                    clear_zero3_grad_partitions(self.engine, self.zero_stage)
                for name, value in {"total": total, **losses}.items():
                    losses_sum[name] = losses_sum.get(name, 0) + value.detach() / run.grad_accum
            momentum = teacher_momentum(self.step, run.max_steps, cfg.objectives.teacher.momentum,
                                        cfg.objectives.teacher.momentum_end)
            self.module.update_teacher(momentum)
            self.step += 1
            timer.step_done()
            self._log_step(mode, modality, losses_sum, momentum, timer, batch, results)
            # mask pictures of image steps only (a clip has no single picture); every rank agrees
            if run.image_log_every and self.step % run.image_log_every == 0 and modality == "image":
                log_mask_images(self.module, batch, mode, self.monitor, self.step, cfg)
            if run.eval_every > 0 and self.step % run.eval_every == 0 and self.step < run.max_steps:
                self.evaluate()
            stop = self.stop.agreed_at(self.step, run.stop_check_every, self.device)
            if stop or self.step % run.checkpoint_every == 0 or self.step == run.max_steps:
                self.save()
            if stop:
                self.monitor.message(f"stop signal: checkpoint saved at step {self.step}; exiting")
                results["preempted"] = True
                break
        else:
            if run.eval_every >= 0:
                results["eval_after"] = self.evaluate()
                self._summarise_retrieval(results)
        results["end_step"] = self.step
        self.monitor.close()
        return results

    def _summarise_retrieval(self, results: dict) -> None:
        before, after = results.get("eval_before"), results.get("eval_after")
        if not before or not after:
            return
        chance = 1.0 / after["num_texts"]
        self.monitor.message(
            f"retrieval R@1 before -> after: i2t {before['i2t_r1']:.3f} -> {after['i2t_r1']:.3f}, "
            f"t2i {before['t2i_r1']:.3f} -> {after['t2i_r1']:.3f}; chance {chance:.4f} "
            f"(after = {after['i2t_r1'] / chance:.1f}x chance i2t, {after['t2i_r1'] / chance:.1f}x t2i)")

    def _temperature(self) -> float:
        """The temperature the last forward's ITC loss used (the clamped working copy)."""
        return float(self.module.temperature_used)

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step == self.cfg.run.max_steps

    def _plain_grad_norm(self) -> float | None:
        """DeepSpeed reports the global grad norm for ZeRO >= 1 and bf16; for fp32 ZeRO-0 it clips
        without keeping the norm, so compute it from the (already all-reduced) gradients."""
        if self.zero_stage != 0 or self.precision != "fp32":
            return None
        grads = [p.grad for _, p in self.module.student_parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _log_sample_keys(self, micro: int, modality: str, keys: list[str]) -> None:
        """run.log_sample_keys: this rank's sample keys per micro-step, one JSON line each (step is
        1-based, as the loss scalars), flushed at once so a killed run keeps what it trained on."""
        path = self.output_dir / "sample_keys" / f"rank{self.dist.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": self.step + 1, "micro": micro, "modality": modality,
                                "keys": keys}) + "\n")

    def _log_step(self, mode, modality, losses_sum, momentum, timer, batch, results) -> None:
        cfg, run = self.cfg, self.cfg.run
        # every step: the curriculum alternates, the modality follows its schedule
        self.monitor.scalars(self.step, {"curriculum/mode": MODE_IDS[mode],
                                         "data/modality": MODALITY_IDS[modality]})
        if not self._logs_at(self.step):
            return
        values = _mean_over_ranks(losses_sum)
        results["step_losses"][self.step] = values
        per_step = timer.seconds_per_step
        world = self.dist.world_size
        samples = cfg.data.batch_size * run.grad_accum * world
        num_mlm = int((batch["mlm_labels"] != -100).sum()) * world
        flops = step_flops(cfg.model, cfg.objectives, self.module.active(mode), mode,
                           cfg.data.batch_size * run.grad_accum * world, batch["input_ids"].shape[1],
                           num_mlm * run.grad_accum,
                           num_frames=batch["images"].shape[1] if batch["images"].ndim == 5 else 1).total
        peak = peak_flops(self.device)
        scalars = {f"loss/{k}": v for k, v in values.items()}
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = self._grad_norm_fallback if grad_norm is None else grad_norm
        scalars.update({
            "train/lr": self.scheduler.get_last_lr()[0],  # group 0: the towers' (base) rate
            "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
            "train/itc_temperature": self._temperature(),
            "train/teacher_momentum": momentum,
            "perf/samples_per_sec": samples / per_step,
            "perf/tflops": flops / per_step / 1e12 / world,
            "perf/mfu": mfu(flops, per_step, world, peak),
            "perf/data_wait": timer.data_wait,
            "mem/peak_gb": peak_memory_gb(self.device),
        })
        scalars.update({f"data/skipped/{r}": n for r, n in _sum_skips(self.loader.skip_counts(), self.device).items()})
        consumed = self.loader.samples_consumed()  # global counts, the same on every rank
        scalars.update({f"data/samples/{kind}": consumed.get(kind, 0) for kind in MODALITIES})
        self.monitor.scalars(self.step, scalars)
        self.monitor.progress(self.step, {"loss": values["total"], "mode": MODE_IDS[mode],
                                          "samples/s": samples / per_step})
        timer.reset()
