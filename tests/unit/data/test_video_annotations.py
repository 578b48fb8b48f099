"""MSRVTT-style video-text annotations (JSON and JSONL on disk, real mp4 files): the reader, its
counted skips and mismatch errors; the video task dataset's frame draw against a plain decode of
every frame; bad clips in training and evaluation batches; the config check."""
from __future__ import annotations

import json
import os
import random

import av
import numpy as np
import pytest
import torch

from megavl.config import ConfigError, load_config
from megavl.data.annotations import load_retrieval, load_video_retrieval, pre_caption
from megavl.data.task_data import TaskCollator, VideoTaskDataset, open_video_file
from megavl.data.transforms import eval_transform, train_transform
from megavl.data.decode_video import sample_frame_ids
from megavl.errors import DataError
from megavl.tools.synth_videos import encode_mp4

NUM_FRAMES = 12


def numbered_clip(num_frames: int = NUM_FRAMES, size: int = 32) -> bytes:
    """Frame t is a flat grey of level 12 * t + 20 (lossless): the level tells which frame it is."""
    return encode_mp4([np.full((size, size, 3), 12 * t + 20, np.uint8) for t in range(num_frames)], crf=0)


def all_frames(path) -> torch.Tensor:
    """Reference: every frame of the file, plainly decoded, (n, 3, H, W) uint8."""
    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1)
                            for f in container.decode(video=0)])


@pytest.fixture
def videos(tmp_path):
    root = tmp_path / "root"
    (root / "clips").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (root / "clips" / f"{name}.mp4").write_bytes(numbered_clip())
    (root / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    return root


ROWS = [{"video": "clips/a.mp4", "caption": "The red circle moves to the LEFT."},
        {"video": "clips/a.mp4", "caption": "a red circle moving left"},        # a second caption
        {"video": "clips/b.mp4", "caption": ["the square grows", "a growing square"]},
        {"video": "clips/missing.mp4", "caption": "nowhere"},                    # missing_video_file
        {"video": "clips/c.mp4"},                                                # bad_entry
        {"video": "clips/c.mp4", "caption": "!!!"},                              # empty_caption
        {"video": "clips/c.mp4", "caption": "the cross moves up"}]


def _expected_set(out, root):
    assert out.images == [str(root / "clips" / "a.mp4"), str(root / "clips" / "b.mp4"),
                          str(root / "clips" / "c.mp4")]
    assert out.texts == ["the red circle moves to the left", "a red circle moving left",
                         "the square grows", "a growing square", "the cross moves up"]
    assert out.txt2img == [0, 0, 1, 1, 2] and out.img2txt == [[0, 1], [2, 3], [4]]


def test_json_and_jsonl_give_the_same_set_with_counted_skips(videos, tmp_path):
    json_path = tmp_path / "train.json"
    json_path.write_text(json.dumps(ROWS))
    jsonl_path = tmp_path / "train.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in ROWS[:3]) + "\n{not json\n\n"
                          + "\n".join(json.dumps(r) for r in ROWS[3:]) + "\n")
    from_json = load_video_retrieval(str(json_path), str(videos))
    from_jsonl = load_video_retrieval(str(jsonl_path), str(videos))
    _expected_set(from_json, videos)
    _expected_set(from_jsonl, videos)
    assert dict(from_json.skips) == {"missing_video_file": 1, "bad_entry": 1, "empty_caption": 1}
    assert dict(from_jsonl.skips) == {"missing_video_file": 1, "bad_entry": 2, "empty_caption": 1}


def test_mismatched_files_are_errors_that_name_the_key(videos, tmp_path):
    images = tmp_path / "coco.json"
    images.write_text(json.dumps([{"image": "x.jpg", "caption": "a dog"}]))
    with pytest.raises(ValueError, match=r"'image'.*task\.image_root"):
        load_video_retrieval(str(images), str(videos))
    clips = tmp_path / "msrvtt.jsonl"
    clips.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(ValueError, match=r"'video'.*task\.video_root"):
        load_retrieval(str(clips), str(videos))
    with pytest.raises(DataError):
        load_video_retrieval(str(tmp_path / "absent.jsonl"), str(videos))


def test_frames_match_a_plain_decode_of_every_frame(videos):
    path = videos / "clips" / "a.mp4"
    reference = all_frames(path)
    assert len(reference) == NUM_FRAMES
    centres = open_video_file(str(path), 4, None, 10**6)
    assert torch.equal(centres, reference[sample_frame_ids(NUM_FRAMES, 4, None)])
    drawn = open_video_file(str(path), 4, random.Random(3), 10**6)
    assert torch.equal(drawn, reference[sample_frame_ids(NUM_FRAMES, 4, random.Random(3))])
    assert open_video_file(str(videos / "clips" / "nope.mp4"), 4, None, 10**6) == "missing_video_file"
    assert open_video_file(str(videos / "clips" / "broken.mp4"), 4, None, 10**6) == "corrupt_video"
    assert open_video_file(str(path), NUM_FRAMES + 1, None, 10**6) == "too_few_frames"


def _level_ids(clip_T3HW: torch.Tensor) -> list[int]:
    return [round((f.float().mean().item() - 20) / 12) for f in clip_T3HW]


def test_training_draw_depends_on_seed_epoch_and_item_only(videos):
    items = [str(videos / "clips" / f"{n}.mp4") for n in ("a", "b", "c")]
    fields = lambda path: ([path], {})  # noqa: E731
    train = VideoTaskDataset(items, fields, 4, train=True, seed=5)
    again = VideoTaskDataset(items, fields, 4, train=True, seed=5)
    draws = {}
    for epoch in range(6):
        train.epoch = again.epoch = epoch
        ids = _level_ids(train[0]["images"][0])
        assert ids == _level_ids(again[0]["images"][0])        # a resumed run draws the same frames
        draws[epoch] = tuple(ids)
        assert ids == sorted(ids) and len(set(ids)) == 4
    assert len(set(draws.values())) > 1                          # a new draw every epoch
    evaluation = VideoTaskDataset(items, fields, 4, train=False, seed=5)
    assert _level_ids(evaluation[1]["images"][0]) == sample_frame_ids(NUM_FRAMES, 4, None)


def test_bad_clip_leaves_a_training_batch_and_is_black_in_evaluation(videos):
    from megavl.data.text import build_tokenizer

    tokenizer = build_tokenizer("")
    items = [str(videos / "clips" / n) for n in ("a.mp4", "broken.mp4", "b.mp4")]
    fields = lambda path: ([path], {"text": "a clip"})  # noqa: E731
    mean, std = [0.5] * 3, [0.25] * 3
    for train in (True, False):
        dataset = VideoTaskDataset(items, fields, 4, train=train, seed=0)
        transform = train_transform(16, [0.8, 1.0], False, False) if train else eval_transform(16)
        collate = TaskCollator(transform, mean, std, tokenizer, 8, train=train, image_size=16,
                               clip_frames=4)
        batch = collate([dataset[i] for i in range(3)])
        assert batch["skipped"] == ["corrupt_video"]
        if train:
            assert batch["images"].shape == (2, 4, 3, 16, 16) and batch["index"].tolist() == [0, 2]
            # retrieval's collator keeps B rows (equal shapes to gather over ranks): a copy fills in
            keep = TaskCollator(transform, mean, std, tokenizer, 8, train=True, image_size=16,
                                clip_frames=4, keep_batch_size=True)
            kept = keep([dataset[i] for i in range(3)])
            assert kept["images"].shape == (3, 4, 3, 16, 16) and kept["index"].tolist() == [0, 2, 2]
            assert kept["skipped"] == ["corrupt_video"]
            # every item failed: B black rows, not torch.stack([]) on one rank while the others wait
            failed = keep([dataset[1], dataset[1]])
            assert failed["images"].shape == (2, 4, 3, 16, 16) and failed["skipped"] == ["corrupt_video"] * 2
        else:
            assert batch["images"].shape == (3, 4, 3, 16, 16) and batch["index"].tolist() == [0, 1, 2]
            black = (0 - 0.5) / 0.25
            assert torch.allclose(batch["images"][1], torch.full((4, 3, 16, 16), black))
            # the evaluation resize keeps each frame's grey level: frame order survives collation
            levels = ((batch["images"][0].mean(dim=(1, 2, 3)) * 0.25 + 0.5) * 255 - 20) / 12
            assert levels.round().tolist() == sample_frame_ids(NUM_FRAMES, 4, None)


def test_config_refuses_clips_for_a_model_without_temporal_embedding():
    base = ["task.name=retrieval", "task.train=[x.jsonl]", "task.video_root=/v",
            "objectives.mim_pixel.weight=0"]
    with pytest.raises(ConfigError, match=r"data\.num_frames"):
        load_config(None, base + ["model.vision.num_frames=1", "data.num_frames=4"])
    cfg = load_config(None, base + ["model.vision.num_frames=4", "data.num_frames=4"])
    assert cfg.task.video_root == "/v"
    with pytest.raises(ConfigError, match=r"task\.video_root"):
        load_config(None, ["task.name=vqa", "task.train=[x.json]", "task.video_root=/v"])


def test_synth_videos_writes_msrvtt_files_and_contrast_twins(tmp_path):
    from megavl.data.shards import iter_raw_samples, read_field
    from megavl.tools import synth_videos

    synth_videos.main(["--out", str(tmp_path), "--num-train", "2", "--num-val", "0", "--num-test", "4",
                       "--seed", "1", "--image-size", "32", "--num-frames", "8", "--contrast-pairs"])
    test = load_video_retrieval(str(tmp_path / "msrvtt_test.jsonl"), str(tmp_path))
    assert len(test.images) == 4 and test.img2txt == [[0], [1], [2], [3]] and not test.skips
    shard = {s["__key__"]: s for s in iter_raw_samples(str(tmp_path / "test-000000.tar"))}
    for path, text in zip(test.images, test.texts):
        sample = shard[os.path.basename(path)[:-4]]
        assert open(path, "rb").read() == read_field(sample, "mp4")   # the same clip as the shard's
        assert pre_caption(read_field(sample, "txt").decode()) == text
    opposite = {"left": "right", "up": "down", "grows": "shrinks"}
    for first, second in ((0, 1), (2, 3)):
        a, b = test.texts[first].split(" "), test.texts[second].split(" ")
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(a) == len(b) and len(changed) == 1                  # only the motion word differs
        x, y = changed[0]
        assert opposite.get(x) == y or opposite.get(y) == x
        # the twin is the clip played backwards: the same frames in reverse order (x264 noise aside)
        fa, fb = all_frames(test.images[first]).float(), all_frames(test.images[second]).float()
        assert (fa - fb.flip(0)).abs().mean() < 2.0 and (fa - fb).abs().mean() > 2.0
