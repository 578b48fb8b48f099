"""Every reason the data layer skips something, in one ordered registry with its meaning.

A skip is never an error: the shard sample, annotation entry or task file is left out (a task's
evaluation scores a file that fails to decode on a black image instead, so every item is scored
once), the count of its reason goes up, and the engine logs it as `data/skipped/<reason>`. Every
place that counts a skip uses one of the names below, never a string of its own (a test checks).

The groups say which counter reports which reasons; each is a fixed, ordered tuple because every
rank reduces the same vector of counts.
"""
from __future__ import annotations

# A pre-training sample (shards), image or video.
MISSING_IMAGE = "missing_image"
EMPTY_IMAGE = "empty_image"
CORRUPT_IMAGE = "corrupt_image"
TOO_MANY_PIXELS = "too_many_pixels"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
BAD_JSON = "bad_json"
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_SHARD = "unreadable_shard"
MISSING_INDEX = "missing_index"
BAD_INDEX = "bad_index"
MISSING_VIDEO = "missing_video"
EMPTY_VIDEO = "empty_video"
CORRUPT_VIDEO = "corrupt_video"
NO_FRAMES = "no_frames"
TOO_FEW_FRAMES = "too_few_frames"
TOO_MANY_FRAMES = "too_many_frames"
WRONG_MODALITY = "wrong_modality"
# A downstream annotation entry or the file it names.
MISSING_IMAGE_FILE = "missing_image_file"
MISSING_VIDEO_FILE = "missing_video_file"
NO_ANSWERS = "no_answers"
UNKNOWN_LABEL = "unknown_label"
UNKNOWN_VQA_SOURCE = "unknown_vqa_source"
BAD_ENTRY = "bad_entry"
# A zero-shot classification sample (data/classification.py).
MISSING_CLASS = "missing_class"

REASONS: dict[str, str] = {
    MISSING_IMAGE: "a sample without a jpg/jpeg/png/webp member",
    EMPTY_IMAGE: "a zero-byte image",
    CORRUPT_IMAGE: "PIL cannot decode the image bytes (a truncated image included)",
    TOO_MANY_PIXELS: "width x height of an image or video frame above data.max_image_pixels, or a "
                     "zero side (a decompression bomb)",
    MISSING_CAPTION: "neither json[caption_key] nor a txt member",
    EMPTY_CAPTION: "a caption that is empty or whitespace (annotations: after pre_caption)",
    CAPTION_NOT_UTF8: "a txt member that is not valid UTF-8",
    BAD_JSON: "a json member that does not parse to an object",
    TRUNCATED_TAR: "a shard that ends mid-archive or was cut after its headers were read (counted "
                   "once per shard read)",
    UNREADABLE_SHARD: "a shard that cannot be opened as a tar",
    MISSING_INDEX: "a shard without a member index (SHARD.tar.idx): its samples are read by walking "
                   "its tar headers (counted once per shard and reader; nothing is lost)",
    BAD_INDEX: "a member index that disagrees with its tar (size, a member outside the file or not "
               "where its header is): ignored, the shard is read by its tar headers (counted once "
               "per shard and reader; nothing is lost)",
    MISSING_VIDEO: "a sample without an mp4/webm/mkv/mov/avi member",
    EMPTY_VIDEO: "a zero-byte video",
    CORRUPT_VIDEO: "FFmpeg cannot open the container or decode its video stream",
    NO_FRAMES: "a video without a video stream or with zero frames",
    TOO_FEW_FRAMES: "fewer frames than the data.num_frames to sample",
    TOO_MANY_FRAMES: "more frames than data.max_video_frames (an hour-long file would stall a worker)",
    WRONG_MODALITY: "an image in a video source or the reverse (a batch holds one modality)",
    MISSING_IMAGE_FILE: "an annotation's image path that is not a file under its root",
    MISSING_VIDEO_FILE: "an annotation's video path that is not a file under its root",
    NO_ANSWERS: "a VQA training or evaluation question without answers",
    UNKNOWN_LABEL: "an NLVR2 label other than \"True\"/\"False\"",
    UNKNOWN_VQA_SOURCE: "a VQA \"dataset\" value without an image root",
    BAD_ENTRY: "an annotation entry missing a required key or of the wrong type (a JSONL line "
               "that is not JSON included)",
    MISSING_CLASS: "a classification shard sample without its class index (a `cls` member of digits or "
                   "an integer json[class_key])",
}

# Not a skip: a training slot whose sample was skipped, filled with a copy of a good sample of the
# same rank share (TrainLoader.repeat_count). Counted in the same per-worker counter.
REPEATED = "repeated"

# What decode_image.decode_sample can return for a shard sample.
IMAGE_SAMPLE_SKIP_REASONS = (MISSING_IMAGE, EMPTY_IMAGE, CORRUPT_IMAGE, TOO_MANY_PIXELS,
                             MISSING_CAPTION, EMPTY_CAPTION, CAPTION_NOT_UTF8, BAD_JSON,
                             TRUNCATED_TAR)
# What decode_video.decode_video_sample can return for a shard sample.
VIDEO_SKIP_REASONS = (MISSING_VIDEO, EMPTY_VIDEO, CORRUPT_VIDEO, NO_FRAMES, TOO_FEW_FRAMES,
                      TOO_MANY_FRAMES, TOO_MANY_PIXELS, MISSING_CAPTION, EMPTY_CAPTION,
                      CAPTION_NOT_UTF8, BAD_JSON, TRUNCATED_TAR)
# Every reason a pre-training loader counts (TrainLoader/EvalLoader.skip_counts: the trainer's tags).
SKIP_REASONS = (MISSING_IMAGE, EMPTY_IMAGE, CORRUPT_IMAGE, TOO_MANY_PIXELS, MISSING_CAPTION,
                EMPTY_CAPTION, CAPTION_NOT_UTF8, BAD_JSON, TRUNCATED_TAR, UNREADABLE_SHARD,
                MISSING_INDEX, BAD_INDEX, MISSING_VIDEO, EMPTY_VIDEO, CORRUPT_VIDEO, NO_FRAMES,
                TOO_FEW_FRAMES, TOO_MANY_FRAMES, WRONG_MODALITY)
# What task_data.open_image_file / open_video_file can return instead of an image / a clip (a file
# has no caption, json or tar members to fail).
IMAGE_FILE_SKIP_REASONS = (MISSING_IMAGE_FILE, EMPTY_IMAGE, CORRUPT_IMAGE, TOO_MANY_PIXELS)
VIDEO_FILE_SKIP_REASONS = (MISSING_VIDEO_FILE, EMPTY_VIDEO, CORRUPT_VIDEO, NO_FRAMES,
                           TOO_FEW_FRAMES, TOO_MANY_FRAMES, TOO_MANY_PIXELS)
# What zero-shot classification (data/classification.py) can count.
CLASSIFICATION_SKIP_REASONS = (MISSING_IMAGE_FILE, EMPTY_IMAGE, CORRUPT_IMAGE, TOO_MANY_PIXELS, MISSING_IMAGE,
                               MISSING_CLASS, TRUNCATED_TAR, UNREADABLE_SHARD, MISSING_INDEX, BAD_INDEX)
# Every reason a TaskLoader counts (the fine-tuning engine's tags).
TASK_SKIP_REASONS = IMAGE_FILE_SKIP_REASONS + tuple(
    r for r in VIDEO_FILE_SKIP_REASONS if r not in IMAGE_FILE_SKIP_REASONS)
# What the annotation readers (annotations.py) count while loading a file.
ANNOTATION_SKIP_REASONS = (MISSING_IMAGE_FILE, MISSING_VIDEO_FILE, EMPTY_CAPTION, NO_ANSWERS,
                           UNKNOWN_LABEL, UNKNOWN_VQA_SOURCE, BAD_ENTRY)
