"""Video shards through the real train/eval loaders: clips batch as (B, T, 3, S, S), frame draws are
seeded (same stream twice, exact resume from state_dict), bad clips are counted skips."""
from __future__ import annotations

import json

import numpy as np
import torch

from megavl.config import DataConfig
from megavl.data import SKIP_REASONS, build_eval_loader, build_train_loader
from megavl.data.writer import ShardWriter
from megavl.tools.synth_videos import encode_mp4


def write_video_shards(out: str) -> str:
    """12 clips of 6 frames (frame t of clip c is flat grey 10*t + c), plus one corrupt mp4."""
    with ShardWriter(out, samples_per_shard=7, prefix="v-") as writer:
        for c in range(12):
            frames = [np.full((16, 16, 3), 10 * t + c, np.uint8) for t in range(6)]
            writer.write(f"clip{c:03d}", {"mp4": encode_mp4(frames, crf=0), "txt": f"clip {c}".encode(),
                                           "json": json.dumps({"image_id": c}).encode()})
        writer.write("broken", {"mp4": b"not an mp4 at all", "txt": b"broken"})
    return f"{out}/v-{{000000..000001}}.tar"


def config(pattern: str) -> DataConfig:
    return DataConfig(train_shards=[pattern], val_shards=[pattern], batch_size=4, num_workers=0,
                      shuffle_buffer=8, image_size=16, train_crop_scale=[0.9, 1.0], hflip=False,
                      max_text_len=8, num_frames=3)


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def test_video_shards_train_eval_and_resume(tmp_path):
    pattern = write_video_shards(str(tmp_path))
    cfg = config(pattern)
    make = lambda: build_train_loader(cfg, rank=0, world_size=1, mlm_prob=0.15, scl_mask_prob=0.4)  # noqa: E731
    loader = make()
    batches = take(loader, 3)  # one epoch: 13 samples in stats.json -> 3 batches of 4
    assert batches[0]["images"].shape == (4, 3, 3, 16, 16) and batches[0]["images"].dtype == torch.float32
    again = take(make(), 3)
    for a, b in zip(batches, again):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])
    skipped = loader.skip_counts()
    assert "corrupt_video" in SKIP_REASONS and "too_few_frames" in SKIP_REASONS
    # 13 raw samples, 12 used per epoch; the broken one is counted when it falls in the epoch's 12.
    assert skipped["corrupt_video"] in (0, 1)

    resumed = make()
    resumed.load_state_dict(_state_after(make(), 1))
    for a, b in zip(batches[1:], take(resumed, 2)):
        assert a["keys"] == b["keys"] and torch.equal(a["images"], b["images"])

    evaluation = list(build_eval_loader(cfg, rank=0, world_size=1))
    keys = [k for batch in evaluation for k in batch["keys"]]
    assert sorted(keys) == [f"clip{c:03d}" for c in range(12)]  # the broken clip is skipped
    assert evaluation[0]["images"].shape[1:] == (3, 3, 16, 16)


def _state_after(loader, n: int) -> dict:
    take(loader, n)
    return loader.state_dict()


def test_training_frames_differ_by_epoch_but_evaluation_takes_segment_centres(tmp_path):
    from megavl.data.shards import iter_raw_samples
    from megavl.data.stream import decode_any, frame_seed

    pattern = write_video_shards(str(tmp_path))
    raw = next(iter(iter_raw_samples(pattern.replace("{000000..000001}", "000000"))))
    draws = {tuple(decode_any(raw, caption_key="caption", max_pixels=10**6, num_frames=3,
                              seed=frame_seed(0, epoch, 0)).frame_ids) for epoch in range(12)}
    assert len(draws) > 1
    ev = decode_any(raw, caption_key="caption", max_pixels=10**6, num_frames=3, train=False)
    assert ev.frame_ids == [0, 2, 4]
