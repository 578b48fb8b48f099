"""One rank of a 2-rank gloo world for test_trust_checkpoint.py. Rank 0 writes a foreign ZeRO-0
checkpoint whose pickle, when loaded, records the loading rank in a file; then every rank:

1. asks for it as task.init_from without --trust-checkpoint: refused, nothing unpickled;
2. resumes it (Trainer, --resume <tag>) without --trust-checkpoint: refused, nothing unpickled;
3. reads it with --trust-checkpoint: rank 0 alone unpickles it, every rank gets its weights;
4. evaluates it with megavl-evaluate without --trust-checkpoint: exit code 2, nothing unpickled.

Writes rank{R}.json: what each step saw."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import yaml  # noqa: E402

from megavl.config import load_config, to_dict  # noqa: E402
from megavl.engine.launch import init_distributed  # noqa: E402
from megavl.engine.task_init import read_init  # noqa: E402
from megavl.engine.trust import UntrustedCheckpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def record_unpickle(folder: str) -> torch.Tensor:
    """Run by the unpickler: leaves the loading rank's name in `folder`."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
    (Path(folder) / f"unpickled_by_rank{rank}").touch()
    return torch.zeros(1)


class Probe:
    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __reduce__(self):
        return record_unpickle, (self.folder,)


def weights() -> dict[str, torch.Tensor]:
    tied = torch.arange(6.0).view(2, 3)
    return {"student.a": tied, "student.tied": tied, "student.b": torch.linspace(0, 1, 5)}


def main(out: str) -> None:
    out = Path(out)
    dist = init_distributed()
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run.output_dir={out / 'run'}", "data.num_workers=0"])
    probes = out / "probes"
    tag = out / "downloaded" / "step_00000002"
    if dist.rank == 0:
        probes.mkdir(parents=True)
        tag.mkdir(parents=True)
        torch.save({"module": {**weights(), "student.probe": Probe(probes)}}, tag / "mp_rank_00_model_states.pt")
        (tag / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
        # a complete megavl tag as far as its JSON goes: the refusal must not depend on it being broken
        (tag / "megavl").mkdir()
        (tag / "megavl" / "meta.json").write_text(json.dumps({"step": 2, "run_id": "f0", "world_size": 1,
                                                              "zero_stage": 0}))
        (tag / "COMPLETE.json").write_text(json.dumps({"run_id": "f0", "step": 2, "files": {}}))
    torch.distributed.barrier()
    seen = {}
    own, scratch = out / "run" / "checkpoints", out / "run" / ".init_from"
    try:
        read_init(str(tag), own_checkpoints=own, scratch=scratch)
    except UntrustedCheckpoint as err:
        seen["init_from_refused"] = str(err)
    torch.distributed.barrier()
    seen["unpickled_after_refusals"] = sorted(p.name for p in probes.iterdir())

    from megavl.engine.trainer import Trainer

    try:
        Trainer(cfg, "ds_configs/zero0.json", resume=str(tag))
    except UntrustedCheckpoint as err:
        seen["resume_refused"] = str(err)
    torch.distributed.barrier()
    seen["unpickled_after_resume_refusal"] = sorted(p.name for p in probes.iterdir())

    state, _ = read_init(str(tag), trust=True, own_checkpoints=own, scratch=scratch)
    torch.distributed.barrier()
    seen["unpickled_after_trusted_read"] = sorted(p.name for p in probes.iterdir())
    seen["scratch_left"] = scratch.exists()
    seen["equal"] = {k: torch.equal(state[k], v) for k, v in weights().items()}
    seen["keys"] = sorted(state)
    torch.distributed.barrier()
    if dist.rank == 0:
        for probe in probes.iterdir():
            probe.unlink()
    torch.distributed.barrier()

    from megavl.tools.evaluate import main as evaluate  # last: it leaves the process group

    seen["evaluate_code"] = evaluate(["--config", "configs/finetune_vqa_tiny.yaml", "--weights", str(tag),
                                      "--out", str(out / "eval"), "--set", "data.num_workers=0"])
    seen["unpickled_by_evaluate"] = sorted(p.name for p in probes.iterdir())
    (out / f"rank{dist.rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
