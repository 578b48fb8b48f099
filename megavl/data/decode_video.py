"""Raw video sample -> T sampled RGB frames + caption + id, or the reason it must be skipped.

The video counterpart of decode.py for shards in the video2dataset layout (`KEY.mp4` + `KEY.txt`
+ `KEY.json`). The mp4 is decoded straight from its bytes (an in-memory file object handed to
FFmpeg through PyAV; no temporary file). PyAV was chosen over torchcodec by bench/bench_video.py:
PyAV's wheels carry FFmpeg, torchcodec needs a system FFmpeg (absent on our CI machines), and the
measured clips/s per core are in the README's performance table.

Frame sampling (SCL's `base_video_dataset.py`): the clip's n frames are cut into T equal
segments [floor(i n / T), floor((i + 1) n / T)); training takes one random frame per segment
(from a seeded random.Random, so a resumed run draws the same frames), evaluation the frame at
each segment's centre. Only frames up to the last sampled one are decoded, and only the sampled
ones are converted to RGB.

Skip reasons (the trainer logs them as `data/skipped/<reason>`), beyond decode.py's caption ones:
  missing_video     no mp4/webm/mkv/mov/avi member
  empty_video       zero-byte video member
  corrupt_video     FFmpeg cannot open the container or decode its video stream
  no_frames         the file holds no video stream or zero frames
  too_few_frames    fewer frames than the T to sample
  too_many_frames   more frames than `max_video_frames` (an hour-long file would stall a worker)
  too_many_pixels   width * height of a frame above `max_pixels`, or a zero side
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

import torch

from megavl.data.decode_image import SKIP_REASONS, Decoded, _image_id, _Skip, decode_sample, meta_and_caption
from megavl.data.sources import derive_seed
from megavl.data.shards import RawSample, read_field

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
VIDEO_SKIP_REASONS = ("missing_video", "empty_video", "corrupt_video", "no_frames", "too_few_frames",
                      "too_many_frames", "too_many_pixels", "missing_caption", "empty_caption",
                      "caption_not_utf8", "bad_json", "truncated_tar")
DEFAULT_MAX_VIDEO_FRAMES = 18_000  # 10 minutes at 30 fps; WebVid clips average ~18 s
# Every reason the pipeline can count: images' and videos' (the trainer logs each as a tag).
ALL_SKIP_REASONS = SKIP_REASONS + tuple(r for r in VIDEO_SKIP_REASONS if r not in SKIP_REASONS)


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


def _count_frames(container, stream) -> int:
    """Frames in the stream: the container's count (mp4 stores it), else decode and count."""
    if stream.frames > 0:
        return stream.frames
    count = sum(1 for _ in container.decode(stream))
    container.seek(0)
    return count


def decode_frames(data: bytes, num_samples: int, rng: random.Random | None, max_pixels: int,
                  max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES) -> tuple[torch.Tensor, list[int]]:
    """Decode T sampled frames of an encoded video held in memory -> (uint8 (T, 3, H, W), frame ids).

    Raises _Skip with a VIDEO_SKIP_REASONS reason for any file it cannot use.
    """
    import av  # imported here: image-only users and the config layer need no FFmpeg

    if not data:
        raise _Skip("empty_video")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise _Skip("no_frames")
            stream = container.streams.video[0]
            stream.thread_type = "SLICE"  # one core per worker: no frame-thread pool per clip
            width, height = stream.codec_context.width, stream.codec_context.height
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise _Skip("too_many_pixels")
            total = _count_frames(container, stream)
            if total == 0:
                raise _Skip("no_frames")
            if total > max_video_frames:
                raise _Skip("too_many_frames")
            if total < num_samples:
                raise _Skip("too_few_frames")
            frame_ids = sample_frame_ids(total, num_samples, rng)
            frames = _decode_at(container, stream, frame_ids)
            if len(frames) < num_samples:
                # The header overstated the frame count: sample again from the true count.
                true_total = _count_frames_by_decoding(container, stream)
                if true_total < num_samples:
                    raise _Skip("too_few_frames" if true_total else "no_frames")
                frame_ids = sample_frame_ids(true_total, num_samples, rng)
                frames = _decode_at(container, stream, frame_ids)
    except _Skip:
        raise
    except (av.FFmpegError, ValueError, IndexError, OverflowError):
        raise _Skip("corrupt_video") from None
    return torch.stack(frames), frame_ids


def _count_frames_by_decoding(container, stream) -> int:
    container.seek(0)
    count = sum(1 for _ in container.decode(stream))
    container.seek(0)
    return count


def _decode_at(container, stream, frame_ids: list[int]) -> list[torch.Tensor]:
    """Decode in order up to the last wanted frame; convert only the wanted ones to RGB (3, H, W)."""
    wanted = set(frame_ids)
    last = frame_ids[-1]
    out: dict[int, torch.Tensor] = {}
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            out[index] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
        if index >= last:
            break
    container.seek(0)
    return [out[i] for i in frame_ids if i in out]


def decode_video_sample(raw: RawSample, *, caption_key: str, max_pixels: int, num_frames: int = 4,
                        train: bool = True, seed: int = 0,
                        max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES) -> DecodedVideo | str:
    """Decode one raw video sample; returns a DecodedVideo, or a skip reason from VIDEO_SKIP_REASONS.

    train=True draws one random frame per segment from random.Random(seed): pass a seed that is a
    function of (run seed, epoch, sample key) so each epoch sees new frames and a resume the same.
    train=False takes the segment centres (seed unused). `max_pixels` bounds one frame.
    """
    try:
        meta, caption = meta_and_caption(raw, caption_key)
        ext = next((e for e in VIDEO_EXTS if e in raw), None)
        if ext is None:
            raise _Skip("missing_video")
        data = read_field(raw, ext)
        rng = random.Random(seed) if train else None
        clip, frame_ids = decode_frames(data, num_frames, rng, max_pixels, max_video_frames)
        return DecodedVideo(raw["__key__"], clip, caption, _image_id(meta, data), frame_ids)
    except _Skip as skip:
        return skip.reason
    except (OSError, EOFError):  # the shard changed or was cut after its headers were read
        return "truncated_tar"


def frame_seed(run_seed: int, raw: RawSample, epoch: int) -> int:
    """The training frame draw of one sample: a function of (run seed, epoch, where the sample lies),
    so every epoch draws new frames and a resumed run the same ones."""
    return derive_seed(run_seed, "frames", epoch, raw["__url__"], raw["__index__"], raw.get("__pass__", 0))


def decode_any(raw: RawSample, *, caption_key: str, max_pixels: int, draft_size: int = 0,
               num_frames: int = 4, train: bool = True, seed: int = 0,
               max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES) -> Decoded | str:
    """The pipeline's decode stage for image and video shards alike: a sample with a video member
    (VIDEO_EXTS) decodes as a clip (decode_video_sample), any other as an image (decode_sample)."""
    if any(ext in raw for ext in VIDEO_EXTS):
        return decode_video_sample(raw, caption_key=caption_key, max_pixels=max_pixels, num_frames=num_frames,
                                   train=train, seed=seed, max_video_frames=max_video_frames)
    return decode_sample(raw, caption_key=caption_key, max_pixels=max_pixels, draft_size=draft_size)
