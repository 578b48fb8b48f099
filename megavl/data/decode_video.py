"""Decode stage, videos: raw shard sample -> DecodedVideo (T sampled RGB frames, caption, id), or
the reason it is skipped (skips.VIDEO_SKIP_REASONS); `decode_frames` also decodes the video files
of the task datasets (task_data.py).

The video counterpart of decode_image.py for shards in the video2dataset layout (`KEY.mp4` +
`KEY.txt` + `KEY.json`). The mp4 is decoded straight from its bytes (an in-memory file object handed to
FFmpeg through PyAV; no temporary file). PyAV rather than torchcodec (bench/bench_video.py measures
clips/s per core of both): PyAV's wheels carry FFmpeg, torchcodec needs a system FFmpeg (absent on
our CI machines).

Frame sampling (SCL's `base_video_dataset.py`): the clip's n frames are cut into T equal
segments [floor(i n / T), floor((i + 1) n / T)); training takes one random frame per segment
(from a seeded random.Random, so a resumed run draws the same frames), evaluation the frame at
each segment's centre. Frame i is the i-th frame the decoder outputs (presentation order).

How a sampled frame is reached: the stream's packets are read once without decoding (cheap: no
pixels), which gives every frame's presentation timestamp (pts, sorted: B-frames come out in that
order) and the keyframes'. For each sampled frame the demuxer seeks to the last keyframe at or
before it, and the decoder runs forward from there to the frame's pts; a frame in the GOP already
being decoded is reached by decoding on, without a seek. A clip costs T GOPs of decoding at most,
not the whole file up to its last sampled frame. Where that cannot be trusted (a packet without a
pts, duplicate pts, no keyframe at the start, a seek that lands past the frame or a frame the
decoder never outputs), the clip is decoded from its start instead: the same frames, slower. Only
the sampled frames are converted to RGB.
"""
from __future__ import annotations

import bisect
import io
import random
from dataclasses import dataclass, field

import torch

from megavl.data.decode_image import Decoded, SkipSample, image_id_of, meta_and_caption
from megavl.data.shards import RawSample, read_field
from megavl.data.skips import (CORRUPT_VIDEO, EMPTY_VIDEO, MISSING_VIDEO, NO_FRAMES, TOO_FEW_FRAMES,
                               TOO_MANY_FRAMES, TOO_MANY_PIXELS, TRUNCATED_TAR)

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
DEFAULT_MAX_VIDEO_FRAMES = 18_000  # 10 minutes at 30 fps; WebVid clips average ~18 s


@dataclass
class DecodedVideo(Decoded):
    """A video sample that survived decoding: `image` is the clip, uint8 (T, 3, H, W).

    A subclass of Decoded so the pipeline's good/bad bookkeeping treats both alike; torchvision's
    v2 transforms applied to the (T, 3, H, W) tensor draw ONE crop/flip for all T frames.
    """

    image: torch.Tensor
    frame_ids: list[int] = field(default_factory=list)  # which frames of the file were sampled


def segment_bounds(num_frames: int, num_samples: int) -> list[tuple[int, int]]:
    """T equal segments [lo, hi) covering frames 0..n-1; each non-empty when n >= T."""
    return [(i * num_frames // num_samples, (i + 1) * num_frames // num_samples)
            for i in range(num_samples)]


def sample_frame_ids(num_frames: int, num_samples: int, rng: random.Random | None) -> list[int]:
    """One frame per equal segment: random within it when `rng` is given (training), else its
    centre (evaluation). Ascending; distinct when num_frames >= num_samples."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_frames < num_samples:
        raise ValueError(f"cannot sample {num_samples} distinct frames from {num_frames}")
    bounds = segment_bounds(num_frames, num_samples)
    if rng is None:
        return [(lo + hi - 1) // 2 for lo, hi in bounds]
    return [rng.randrange(lo, hi) for lo, hi in bounds]


@dataclass
class FrameIndex:
    """Where a stream's frames are, read from its packets: `pts[i]` is frame i's presentation
    timestamp (stream time base, ascending), `keyframes` the keyframes' pts (ascending)."""

    pts: list[int]
    keyframes: list[int]

    def keyframe_before(self, pts: int) -> int:
        return self.keyframes[bisect.bisect_right(self.keyframes, pts) - 1]


def frame_index(container, stream) -> FrameIndex | None:
    """Demux (no decoding) the stream's packets into a FrameIndex; None where seeking by it cannot
    be trusted: a packet without pts, two frames with one pts, no keyframe at or before the first
    frame, or a demuxer error (the sequential path then meets the same error, or decodes what it can).
    Packets the demuxer marks as discarded (before an edit list's start) give no frame."""
    import av

    pts: list[int] = []
    keyframes: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # the flush packet at the end; edit lists
                continue
            if packet.pts is None:
                return None
            pts.append(packet.pts)
            if packet.is_keyframe:
                keyframes.append(packet.pts)
    except (av.FFmpegError, ValueError, IndexError, OverflowError):
        return None
    pts.sort()
    keyframes.sort()
    if not pts or len(set(pts)) != len(pts) or not keyframes or keyframes[0] > pts[0]:
        return None
    return FrameIndex(pts, keyframes)


def _count_frames(container, stream, index: FrameIndex | None) -> int:
    """Frames in the stream: the container's count (mp4 stores it), else the packets' (mkv, webm),
    else decode and count."""
    if stream.frames > 0:
        return stream.frames
    if index is not None:
        return len(index.pts)
    return _count_frames_by_decoding(container, stream)


def decode_frames(data: bytes, num_samples: int, rng: random.Random | None, max_pixels: int,
                  max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES, *,
                  seek: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Decode T sampled frames of an encoded video held in memory -> (uint8 (T, 3, H, W), frame ids).

    seek=False decodes from the start up to the last sampled frame (the reference the seeking
    path is tested and benchmarked against; the same frames). Raises SkipSample with a
    skips.VIDEO_SKIP_REASONS reason for any file it cannot use.
    """
    import av  # imported here: image-only users and the config layer need no FFmpeg

    if not data:
        raise SkipSample(EMPTY_VIDEO)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise SkipSample(NO_FRAMES)
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # one core per worker: no frame-thread pool per clip
            width, height = stream.codec_context.width, stream.codec_context.height
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise SkipSample(TOO_MANY_PIXELS)
            if stream.frames > max_video_frames:  # before reading every packet of a long file
                raise SkipSample(TOO_MANY_FRAMES)
            index = frame_index(container, stream) if seek else None
            total = _count_frames(container, stream, index)
            if total == 0:
                raise SkipSample(NO_FRAMES)
            if total > max_video_frames:
                raise SkipSample(TOO_MANY_FRAMES)
            if total < num_samples:
                raise SkipSample(TOO_FEW_FRAMES)
            frame_ids = sample_frame_ids(total, num_samples, rng)
            frames = _decode_at(container, stream, index, frame_ids)
            if len(frames) < num_samples:
                # The header overstated the frame count: sample again from the true count.
                true_total = _count_frames_by_decoding(container, stream)
                if true_total < num_samples:
                    raise SkipSample(TOO_FEW_FRAMES if true_total else NO_FRAMES)
                frame_ids = sample_frame_ids(true_total, num_samples, rng)
                frames = _decode_at(container, stream, index, frame_ids)
    except SkipSample:
        raise
    except (av.FFmpegError, ValueError, IndexError, OverflowError):
        raise SkipSample(CORRUPT_VIDEO) from None
    return torch.stack(frames), frame_ids


def _count_frames_by_decoding(container, stream) -> int:
    container.seek(0)
    count = sum(1 for _ in container.decode(stream))
    container.seek(0)
    return count


def _rgb(frame) -> torch.Tensor:
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)


def _decode_at(container, stream, index: FrameIndex | None, frame_ids: list[int]) -> list[torch.Tensor]:
    """The wanted frames as RGB uint8 (3, H, W): by seeking where the index allows it, else (or
    where seeking goes wrong) by decoding from the start. Fewer than asked: the stream ended first."""
    if index is not None and frame_ids[-1] < len(index.pts):
        import av

        try:
            frames = _decode_seeking(container, stream, index, frame_ids)
        except (av.FFmpegError, ValueError, IndexError, OverflowError):
            frames = None  # the sequential path decides whether the file is corrupt
        if frames is not None:
            return frames
    return _decode_sequential(container, stream, frame_ids)


def _decode_seeking(container, stream, index: FrameIndex, frame_ids: list[int]) -> list[torch.Tensor] | None:
    """Each wanted frame by a seek to the keyframe at or before it (unless the decoder is already
    in that GOP, before the frame) and decoding on to its pts. None where the decoder's output does
    not land on a wanted pts (a seek past it, a frame it drops, frames without pts)."""
    out: list[torch.Tensor] = []
    frames = None  # the decoder's output after the last seek
    at = None      # pts of the last frame decoded
    for frame_id in frame_ids:
        target = index.pts[frame_id]
        keyframe = index.keyframe_before(target)
        if frames is None or at is None or at >= target or keyframe > at:
            container.seek(keyframe, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        frame = next((f for f in frames if f.pts is None or f.pts >= target), None)
        if frame is None or frame.pts != target:
            return None
        at = frame.pts
        out.append(_rgb(frame))
    return out


def _decode_sequential(container, stream, frame_ids: list[int]) -> list[torch.Tensor]:
    """Decode from the start up to the last wanted frame, counting output frames."""
    container.seek(0)
    wanted = set(frame_ids)
    last = frame_ids[-1]
    out: dict[int, torch.Tensor] = {}
    for position, frame in enumerate(container.decode(stream)):
        if position in wanted:
            out[position] = _rgb(frame)
        if position >= last:
            break
    return [out[i] for i in frame_ids if i in out]


def decode_video_sample(raw: RawSample, *, caption_key: str, max_pixels: int, num_frames: int = 4,
                        train: bool = True, seed: int = 0,
                        max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES) -> DecodedVideo | str:
    """Decode one raw video sample; returns a DecodedVideo, or a skip reason (VIDEO_SKIP_REASONS).

    train=True draws one random frame per segment from random.Random(seed): pass a seed that is a
    function of (run seed, epoch, global position) (stream.py) so each epoch sees new frames and a
    resume the same.
    train=False takes the segment centres (seed unused). `max_pixels` bounds one frame.
    """
    try:
        meta, caption = meta_and_caption(raw, caption_key)
        ext = next((e for e in VIDEO_EXTS if e in raw), None)
        if ext is None:
            raise SkipSample(MISSING_VIDEO)
        data = read_field(raw, ext)
        rng = random.Random(seed) if train else None
        clip, frame_ids = decode_frames(data, num_frames, rng, max_pixels, max_video_frames)
        return DecodedVideo(raw["__key__"], clip, caption, image_id_of(meta, data), frame_ids)
    except SkipSample as skip:
        return skip.reason
    except (OSError, EOFError):  # the shard changed or was cut after its headers were read
        return TRUNCATED_TAR

