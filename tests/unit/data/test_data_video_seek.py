"""Sampled video frames reached by seeking to the keyframe before each one equal the frames of
decoding from the start, bit for bit, on real files written here with PyAV: several GOPs, B-frames,
open GOPs, variable frame rate, a container without a frame count; and a seek that cannot land on
its frame falls back to decoding from the start."""
from __future__ import annotations

import io
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from megavl.data.decode_video import FrameIndex, _decode_at, _decode_seeking, decode_frames, frame_index

av = pytest.importorskip("av")

NUM_FRAMES = 90  # 8 GOPs of 12
SIZE = (48, 64)  # H, W


def write_video(fmt: str = "mp4", x264: str = "scenecut=0", vfr: bool = False) -> bytes:
    """Frames that differ everywhere (noise rows over a moving bar), a keyframe every 12 frames,
    up to 3 B-frames; `vfr`: frame intervals of 10, 40 or 73 ms in a 1 ms time base."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = SIZE
        stream.pix_fmt = "yuv420p"
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"g": "12", "bf": "3", "crf": "23", "preset": "veryfast", "threads": "1",
                          "x264-params": x264}
        millis = 0
        for t in range(NUM_FRAMES):
            array = np.full((*SIZE, 3), (t * 7) % 256, np.uint8)
            array[:, : t % SIZE[1]] = 255
            array[t % SIZE[0]] = rng.integers(0, 256, (SIZE[1], 3))
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if vfr:
                frame.pts, frame.time_base = millis, Fraction(1, 1000)
                millis += int(rng.choice([10, 40, 73]))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


VIDEOS = {
    "mp4 closed GOPs with B-frames": dict(),
    "mp4 open GOPs": dict(x264="scenecut=0:open-gop=1"),
    "mp4 variable frame rate": dict(vfr=True),
    "mkv without a frame count": dict(fmt="matroska"),
}


@pytest.fixture(scope="module", params=sorted(VIDEOS))
def video(request) -> bytes:
    return write_video(**VIDEOS[request.param])


def test_seeking_gives_the_frames_of_decoding_from_the_start(video):
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        index = frame_index(container, stream)
        assert index is not None and len(index.pts) == NUM_FRAMES
        assert len(index.keyframes) >= NUM_FRAMES // 12  # several GOPs: the seeks have somewhere to go
        for seed in [None, *range(12)]:
            rng = None if seed is None else random.Random(seed)
            clip, ids = decode_frames(video, 4, rng, max_pixels=10**6)
            rng = None if seed is None else random.Random(seed)
            reference, reference_ids = decode_frames(video, 4, rng, max_pixels=10**6, seek=False)
            assert ids == reference_ids
            assert torch.equal(clip, reference), (seed, ids)
            # and the seeking path is the one that gave them, without falling back
            sought = _decode_seeking(container, stream, index, ids)
            assert sought is not None and torch.equal(torch.stack(sought), reference), (seed, ids)
        # T frames in one GOP, and the last frames of the file
        for ids in ([13, 14, 15, 16], [0, 1, NUM_FRAMES - 2, NUM_FRAMES - 1]):
            reference = _decode_at(container, stream, None, ids)
            assert torch.equal(torch.stack(_decode_seeking(container, stream, index, ids)), torch.stack(reference))


def test_a_seek_that_misses_its_frame_decodes_from_the_start():
    video = write_video()
    with av.open(io.BytesIO(video)) as container:
        stream = container.streams.video[0]
        index = frame_index(container, stream)
        ids = [5, 30, 55, 80]
        wrong = FrameIndex([p + 1 for p in index.pts], index.keyframes)  # pts no frame has
        assert _decode_seeking(container, stream, wrong, ids) is None
        assert torch.equal(torch.stack(_decode_at(container, stream, wrong, ids)),
                           torch.stack(_decode_at(container, stream, None, ids)))
