"""One rank of the 2-rank retrieval-evaluation test: a real DeepSpeed ZeRO-3 engine on gloo, uneven
shares (rank 0: three pair batches, rank 1: one pair batch and an empty one), every score matrix
saved for the test to compare with the single-process reference. argv: out_dir."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieval_cases import K, pair_batches, tiny_config  # noqa: E402

from megavl.tasks.pretrain_eval import evaluate_retrieval  # noqa: E402
from megavl.engine.launch import init_distributed  # noqa: E402
from megavl.engine.step import build_engine  # noqa: E402
from megavl.tasks.retrieval_eval import retrieval_scores  # noqa: E402
from retrieval_cases import clip_batches, dense_batches, tiny_student  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    cfg = tiny_config("data.batch_size=4 run.global_batch_size=8")
    torch.manual_seed(0)
    engine, _, stage = build_engine(cfg, "ds_configs/zero3.json", info.world_size, info.device)
    assert stage == 3
    student = engine.module.student
    pairs = pair_batches()
    share = pairs[:3] if info.rank == 0 else pairs[3:] + [{k: v[:0] for k, v in pairs[0].items()}]
    result = {}
    for rerank in ("none", "itm", "itm+itc"):
        images, texts = dense_batches(pairs)  # dense indices over the whole set, then this rank's share
        mine = slice(0, 3) if info.rank == 0 else slice(3, None)
        result[f"scores/{rerank}"] = retrieval_scores(
            student, images[mine], texts[mine], device=info.device, dtype=torch.float32, k=K, mode="two",
            rerank=rerank, pair_batch=7)
    result["metrics/two"] = evaluate_retrieval(student, share, info.device, torch.float32, itm_rerank_k=K,
                                               mode="two", pair_batch=7)
    result["metrics/single"] = evaluate_retrieval(student, share, info.device, torch.float32, itm_rerank_k=K,
                                                  mode="single", pair_batch=64)
    # clips, all on rank 0: rank 1's dummy passes must give clip-shaped tokens for the gathers
    clip_model = tiny_student(tiny_config("model.vision.num_frames=2")).student
    images, texts = clip_batches()
    result["scores/clips"] = retrieval_scores(
        clip_model, images if info.rank == 0 else [], texts if info.rank == 0 else [], device=info.device,
        dtype=torch.float32, k=3, mode="two", rerank="itm")
    torch.save(result, Path(out_dir) / f"rank{info.rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
