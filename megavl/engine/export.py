"""`megavl-export CKPT OUT`: one safetensors file + config from a (possibly ZeRO-3 sharded) checkpoint.

CKPT is a checkpoint tag directory (<output_dir>/checkpoints/step_XXXXXXXX) or the checkpoints
directory itself (then `latest` picks the tag). OUT receives `model.safetensors` (the student's
weights, fp32) and `config.yaml` (the run's config); `megavl.load_pretrained(OUT)` loads them.
DeepSpeed's files are pickles, which this unpickles: run it on checkpoints you trust; the export
itself loads without unpickling.

--peers also writes the towers for timm (OUT/vision), Hugging Face transformers (OUT/text) and
OpenCLIP (OUT/open_clip): see megavl/engine/export_peers.py and docs/using_elsewhere.md. A model a
peer cannot represent exactly is refused (exit code 2, one line naming the config key).
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
    """Full fp32 weights of the whole PretrainModule: the optimizer's fp32 master, never bf16 module copies.

    ZeRO 1-3 write `[bf16_]zero_pp_rank_*_optim_states.pt` (the bf16_ prefix under bf16): merged by
    DeepSpeed's zero_to_fp32, which maps the files and drops the Adam moments unread. ZeRO-0 keeps
    everything in `mp_rank_*_model_states.pt`; under bf16 its `module` entry holds bf16 weights and
    the fp32 master sits in the optimizer's `fp32_groups`.

    Both unpickle DeepSpeed's files: call it only on a trusted checkpoint (engine/trust.py).
    """
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed model states found")
    # mapped, not read: only the weights (or fp32 masters) are touched, never the Adam moments beside them
    state = torch.load(states[0], map_location="cpu", weights_only=False, mmap=True)
    return _with_fp32_master(state["module"], state.get("optimizer"), states[0])


def _with_fp32_master(module: dict[str, torch.Tensor], optimizer: dict | None, source: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0: replace low-precision module weights by the fp32 master copies of DeepSpeed's bf16/fp16
    wrapper (`fp32_groups`, in the order of the param groups, whose "names" megavl's param_groups set)."""
    low = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
    if not low:
        return module
    masters = (optimizer or {}).get("fp32_groups")
    groups = (optimizer or {}).get("optimizer_state_dict", {}).get("param_groups")
    if masters is None or groups is None or any("names" not in g for g in groups):
        raise ValueError(f"{source}: {len(low)} weights are {module[low[0]].dtype} and the checkpoint has no "
                         f"fp32 master copies with parameter names to export instead")
    out = dict(module)
    by_storage = {}
    for name, tensor in module.items():  # tied weights (MLM decoder = word embeddings) share storage
        by_storage.setdefault(tensor.untyped_storage().data_ptr(), []).append(name)
    for group, fp32 in zip(groups, masters):
        if len(group["names"]) != len(fp32):
            raise ValueError(f"{source}: a param group names {len(group['names'])} parameters but holds "
                             f"{len(fp32)} fp32 masters")
        for name, master in zip(group["names"], fp32):
            if master.shape != module[name].shape:
                raise ValueError(f"{source}: fp32 master of {name} has shape {tuple(master.shape)}, "
                                 f"the module {tuple(module[name].shape)}")
            for alias in by_storage[module[name].untyped_storage().data_ptr()]:
                out[alias] = master
    return out


def export(ckpt: str | Path, out: str | Path, peers: tuple[str, ...] = ()) -> Path:
    """Write OUT/model.safetensors + OUT/config.yaml, and the `peers` formats (export_peers.PEERS)."""
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
    if peers:
        import yaml

        from megavl.config import config_from_saved
        from megavl.engine.export_peers import write_peers

        temp = full.get("temp")  # the ITC temperature the run learned: OpenCLIP's logit scale
        write_peers(student, config_from_saved(yaml.safe_load(config.read_text())), out, peers,
                    temperature=None if temp is None else float(temp.float().reshape(-1)[0]))
    return out


def _peers(value: str) -> tuple[str, ...]:
    from megavl.engine.export_peers import PEERS

    names = PEERS if value == "all" else tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer formats {unknown}: choose from {', '.join(PEERS)} or all")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="checkpoint tag dir, or the checkpoints dir (uses 'latest')")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--peers", type=_peers, default=(), metavar="LIST",
                        help="also write peer formats: all, or a comma list of vision (timm), text "
                             "(transformers), open_clip (OpenCLIP; implies vision and text)")
    args = parser.parse_args(argv)
    from megavl.config import ConfigError

    try:
        out = export(args.ckpt, args.out, args.peers)
    except ConfigError as err:
        print(f"megavl-export: {err}", file=sys.stderr)
        return 2
    print(f"exported {out / 'model.safetensors'}")
    for peer in ("vision", "text", "open_clip"):
        if peer in args.peers or ("open_clip" in args.peers and peer != "open_clip"):
            print(f"exported {peer}: {out / peer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
