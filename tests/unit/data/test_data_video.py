"""Video decoding from real mp4 bytes in a tar: frame sampling, content, bad clips as counted skips,
and the synthetic moving-shapes shards (deterministic, motion-dependent captions)."""
from __future__ import annotations

import json
import random
import tarfile

import numpy as np
import pytest
import torch

from megavl.data.decode_image import Decoded
from megavl.data.decode_video import DecodedVideo, decode_video_sample, sample_frame_ids, segment_bounds
from megavl.data.shards import iter_raw_samples, read_field
from megavl.data.skips import VIDEO_SKIP_REASONS
from megavl.data.writer import ShardWriter
from megavl.tools import synth_videos
from megavl.tools.synth_videos import encode_mp4

pytest.importorskip("av")


def numbered_clip(num_frames: int, size: int = 32) -> bytes:
    """Frame t is a flat grey of level 12 * t + 20: the decoded level tells which frame it is."""
    return encode_mp4([np.full((size, size, 3), 12 * t + 20, np.uint8) for t in range(num_frames)], crf=0)


def frame_index(frame_3HW: torch.Tensor) -> int:
    return round((frame_3HW.float().mean().item() - 20) / 12)


def raw(fields: dict[str, bytes], key: str = "k") -> dict:
    return {"__key__": key, "__url__": "mem", "__index__": 0, **fields}


def test_sampling_one_frame_per_equal_segment():
    assert segment_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert sample_frame_ids(10, 4, None) == [0, 3, 5, 8]        # segment centres
    assert sample_frame_ids(4, 4, None) == [0, 1, 2, 3]
    assert sample_frame_ids(9, 1, None) == [4]
    seen = set()
    for seed in range(200):
        ids = sample_frame_ids(10, 4, random.Random(seed))
        assert all(lo <= i < hi for i, (lo, hi) in zip(ids, segment_bounds(10, 4)))
        seen.add(tuple(ids))
        assert ids == sample_frame_ids(10, 4, random.Random(seed))  # seeded
    assert len(seen) > 20  # every segment's frames get drawn
    with pytest.raises(ValueError):
        sample_frame_ids(3, 4, None)


def test_decodes_the_sampled_frames_from_tar_bytes(tmp_path):
    with ShardWriter(str(tmp_path), 10, prefix="v-") as writer:
        writer.write("clip0", {"mp4": numbered_clip(12), "txt": b"grey levels rise",
                               "json": json.dumps({"image_id": 7}).encode()})
    (sample,) = iter_raw_samples(str(tmp_path / "v-000000.tar"))
    ev = decode_video_sample(sample, caption_key="caption", max_pixels=10**6, num_frames=4, train=False)
    assert isinstance(ev, DecodedVideo) and isinstance(ev, Decoded)
    assert ev.image.shape == (4, 3, 32, 32) and ev.image.dtype == torch.uint8
    assert ev.frame_ids == sample_frame_ids(12, 4, None)
    assert [frame_index(f) for f in ev.image] == ev.frame_ids  # the content of exactly those frames
    assert (ev.caption, ev.image_id, ev.key) == ("grey levels rise", 7, "clip0")
    tr = decode_video_sample(sample, caption_key="caption", max_pixels=10**6, num_frames=3, seed=5)
    assert tr.frame_ids == sample_frame_ids(12, 3, random.Random(5))
    assert [frame_index(f) for f in tr.image] == tr.frame_ids


def test_bad_clips_are_named_skips():
    good = numbered_clip(6)
    cases = {
        "missing_video": {"txt": b"no video"},
        "empty_video": {"mp4": b"", "txt": b"empty"},
        "corrupt_video": {"mp4": b"\x00\x00\x00\x18ftypmp42 this is not a video", "txt": b"junk"},
        "corrupt_video#cut": {"mp4": good[: len(good) // 3], "txt": b"cut in the middle"},
        "too_few_frames": {"mp4": numbered_clip(3), "txt": b"three frames"},
        "too_many_pixels": {"mp4": good, "txt": b"huge"},
        "missing_caption": {"mp4": good},
        "empty_caption": {"mp4": good, "txt": b"   "},
        "caption_not_utf8": {"mp4": good, "txt": b"\xff\xfe"},
        "bad_json": {"mp4": good, "json": b"[1, 2"},
    }
    for name, fields in cases.items():
        reason = name.split("#")[0]
        max_pixels = 100 if reason == "too_many_pixels" else 10**6
        got = decode_video_sample(raw(fields), caption_key="caption", max_pixels=max_pixels, num_frames=4)
        assert got == reason, (name, got)
        assert reason in VIDEO_SKIP_REASONS
    got = decode_video_sample(raw({"mp4": good, "txt": b"long"}), caption_key="caption", max_pixels=10**6,
                              max_video_frames=5)
    assert got == "too_many_frames"


def test_audio_only_file_has_no_frames():
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    got = decode_video_sample(raw({"mp4": buf.getvalue(), "txt": b"audio"}), caption_key="caption",
                              max_pixels=10**6)
    assert got == "no_frames"


def test_synth_videos_deterministic_and_motion_needs_more_than_one_frame(tmp_path):
    args = ["--num-train", "12", "--num-val", "0", "--seed", "3", "--image-size", "32",
            "--num-frames", "8", "--samples-per-shard", "6"]
    synth_videos.main(["--out", str(tmp_path / "a")] + args)
    synth_videos.main(["--out", str(tmp_path / "b")] + args)
    for shard in ("train-000000.tar", "train-000001.tar"):
        for x, y in zip(iter_raw_samples(str(tmp_path / "a" / shard)), iter_raw_samples(str(tmp_path / "b" / shard))):
            assert [read_field(x, e) for e in ("txt", "json")] == [read_field(y, e) for e in ("txt", "json")]
            dx, dy = (decode_video_sample(s, caption_key="caption", max_pixels=10**6, num_frames=8, train=False)
                      for s in (x, y))
            # x264 is not bit-reproducible between encoder instances here: same content, tiny pixel noise.
            assert (dx.image.float() - dy.image.float()).abs().mean() < 2.0
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tf:
        names = tf.getnames()
    assert names[:3] == ["train00000000.mp4", "train00000000.txt", "train00000000.json"]  # video2dataset
    samples = [s for url in ("train-000000.tar", "train-000001.tar")
               for s in iter_raw_samples(str(tmp_path / "a" / url))]
    for s in samples:
        d = decode_video_sample(s, caption_key="caption", max_pixels=10**6, num_frames=8, train=False)
        clip = json.loads(read_field(s, "json"))["clip"]
        assert d.caption.startswith(f"the {clip['colour']} {clip['kind']} {synth_videos.MOTIONS[clip['motion']]}")
        # The motion shows in the decoded frames: the moving colour's centroid / area changes.
        colour = torch.tensor(synth_videos.COLOURS[clip["colour"]]).view(3, 1, 1)
        mask = ((d.image.int() - colour).abs().sum(1) < 60).float()  # (T, H, W)
        area = mask.sum((1, 2))
        xs = (mask * torch.arange(32.0)).sum((1, 2)) / area.clamp(min=1)
        ys = (mask * torch.arange(32.0)[:, None]).sum((1, 2)) / area.clamp(min=1)
        change = {"left": xs[0] - xs[-1], "right": xs[-1] - xs[0], "up": ys[0] - ys[-1],
                  "down": ys[-1] - ys[0], "grow": area[-1] - area[0], "shrink": area[0] - area[-1]}
        assert change[clip["motion"]] > 0, (d.caption, change)


def test_clip_reversed_is_the_opposite_motion():
    """Swapping a trajectory's endpoints gives the opposite caption and the same frames reversed:
    so the set of frames alone cannot tell the two captions apart."""
    clip = synth_videos.Clip("circle", "red", "left", (0.7, 0.5, 0.11), (0.3, 0.5, 0.11))
    back = synth_videos.Clip("circle", "red", "right", clip.end, clip.start)
    assert back.caption() == "the red circle moves to the right"
    forward, backward = synth_videos.render(clip, 32, 5), synth_videos.render(back, 32, 5)
    assert all(np.array_equal(f, b) for f, b in zip(forward, backward[::-1]))
