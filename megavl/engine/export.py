"""`megavl-export CKPT OUT`: one safetensors file + config from a (possibly ZeRO-3 sharded) checkpoint.

CKPT is a checkpoint tag directory (<output_dir>/checkpoints/step_XXXXXXXX) or the checkpoints
directory itself (then `latest` picks the tag). OUT receives `model.safetensors` (the student's
weights, fp32) and `config.yaml` (the run's config); `megavl.load_pretrained(OUT)` loads them.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

STUDENT = "student."


def _resolve(ckpt: Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) from either a tag dir or a checkpoints dir with `latest`."""
    if (ckpt / "latest").is_file():
        return ckpt, (ckpt / "latest").read_text().strip()
    if ckpt.is_dir() and (ckpt.parent / "latest").is_file() or any(ckpt.glob("*model_states.pt")):
        return ckpt.parent, ckpt.name
    raise FileNotFoundError(f"{ckpt}: neither a checkpoint tag directory nor a checkpoints dir with 'latest'")


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the whole PretrainModule: merged ZeRO shards, or the module states of ZeRO-0."""
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states found")
    return torch.load(states[0], map_location="cpu", weights_only=False)["module"]


def export(ckpt: str | Path, out: str | Path) -> Path:
    ckpt_dir, tag = _resolve(Path(ckpt))
    full = consolidated_state_dict(ckpt_dir, tag)
    student = {k[len(STUDENT):]: v.detach().float().contiguous().clone()  # clone: tied weights become two tensors
               for k, v in full.items() if k.startswith(STUDENT)}
    if not student:
        raise ValueError(f"{ckpt_dir / tag}: no student weights in the checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(student, str(out / "model.safetensors"), metadata={"format": "pt", "source": f"{ckpt_dir}/{tag}"})
    config = ckpt_dir / tag / "config.yaml"
    if not config.is_file():
        config = ckpt_dir.parent / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"no config.yaml next to {ckpt_dir / tag} or its run directory")
    shutil.copyfile(config, out / "config.yaml")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint tag dir, or the checkpoints dir (uses 'latest')")
    parser.add_argument("out", help="output directory")
    args = parser.parse_args(argv)
    out = export(args.ckpt, args.out)
    print(f"exported {out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
