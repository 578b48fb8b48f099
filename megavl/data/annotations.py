"""Downstream annotation files as users already have them (JSON on disk + an image root).

Formats (ALBEF `dataset/{caption,vqa,nlvr}_dataset.py`, BLIP `data/coco_karpathy_dataset.py`):
  retrieval train  [{"image": path, "caption": str, "image_id": any}]   one entry per caption
  retrieval eval   [{"image": path, "caption": [str, ...]}]             one entry per image
  video retrieval  [{"video": path, "caption": str | [str, ...]}]       MSRVTT style, JSON or JSONL
                   (train: several captions per video allowed; 1k-A test: one caption per video)
  VQA              [{"question_id", "question", "answer": [10 str], "image", "dataset": "vqa"|"vg"}]
                   (test entries have no "answer"; "answer_type" is kept when present)
  NLVR2            [{"images": [left, right], "sentence": str, "label": "True"|"False"}]
Image paths are relative to an image root (VQA: one root per "dataset" value, VG images differ).

Bad entries are counted skips, never a crash: skips.ANNOTATION_SKIP_REASONS (meanings in skips.py).
A file that does not exist, is not valid JSON (its line and column named) or is not a JSON list is a
DataError (a wrong path or a broken file, not a bad entry: train.py exits 2 with its one line); so is
an image-text file read as video-text or the reverse (every entry would be a skip otherwise).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field

from megavl.data.skips import (BAD_ENTRY, EMPTY_CAPTION, MISSING_IMAGE_FILE, MISSING_VIDEO_FILE,
                               NO_ANSWERS, UNKNOWN_LABEL, UNKNOWN_VQA_SOURCE)
from megavl.errors import DataError

log = logging.getLogger(__name__)

NLVR2_LABELS = {"True": 1, "False": 0}


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF/BLIP caption normalisation: lower case, drop punctuation, '-' and '/' -> space,
    collapse spaces, at most `max_words` words."""
    text = re.sub(r"([,.'!?\"()*#:;~])", "", caption.lower())
    text = re.sub(r"\s{2,}", " ", text.replace("-", " ").replace("/", " ")).strip()
    return " ".join(text.split(" ")[:max_words]) if text else ""


def pre_question(question: str, max_words: int = 50) -> str:
    """ALBEF's question normalisation (same marks as pre_caption, no collapsing)."""
    text = re.sub(r"([,.'!?\"()*#:;~])", "", question.lower())
    text = text.replace("-", " ").replace("/", " ").rstrip(" ")
    return " ".join(text.split(" ")[:max_words])


def read_json_list(path: str) -> list:
    if not os.path.isfile(path):
        raise DataError(f"annotation file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {err.lineno} column {err.colno}: not valid JSON: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}): {err.reason}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(data).__name__}")
    return data


def read_entries(path: str) -> tuple[list, Counter]:
    """The entries of a JSON list, or of a JSONL file (name ending in .jsonl: one JSON value per
    line, blank lines ignored; a line that is not JSON is a counted `bad_entry`)."""
    if not path.endswith(".jsonl"):
        return read_json_list(path), Counter()
    if not os.path.isfile(path):
        raise DataError(f"annotation file {path!r} does not exist")
    entries, skips = [], Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                skips[BAD_ENTRY] += 1
    return entries, skips


def _log_skips(what: str, path: str, skips: Counter) -> None:
    if skips:
        log.warning("%s %s: skipped %s", what, path, dict(skips))


@dataclass
class RetrievalSet:
    """Images (or videos: `images` then holds the video paths) with their captions. `txt2img[t]` is the image of caption t; `img2txt[i]` its
    captions (the form retrieval_metrics takes)."""

    images: list[str]                     # absolute paths
    texts: list[str]                      # pre_caption'ed
    txt2img: list[int]
    img2txt: list[list[int]]
    skips: Counter = field(default_factory=Counter)


def load_retrieval(path: str, image_root: str, max_words: int = 30) -> RetrievalSet:
    """Either form (one entry per caption, or per image with a caption list); entries naming the
    same image are merged, so captions of one image are all positives of each other."""
    return _load_captioned(path, image_root, "image", max_words)


def load_video_retrieval(path: str, video_root: str, max_words: int = 30) -> RetrievalSet:
    """MSRVTT-style `{"video", "caption"}` entries from a JSON list or a JSONL file, paths under
    `video_root`; the same merging as load_retrieval (`RetrievalSet.images` holds the video paths).
    The files are not decoded here: an undecodable clip is counted when it is read."""
    return _load_captioned(path, video_root, "video", max_words)


_OTHER_MEDIA = {"image": "video", "video": "image"}
_MISSING_FILE = {"image": MISSING_IMAGE_FILE, "video": MISSING_VIDEO_FILE}
_ROOT_KEY = {"image": "task.image_root", "video": "task.video_root"}


def _load_captioned(path: str, root: str, media: str, max_words: int) -> RetrievalSet:
    entries, skips = read_entries(path)
    media_index: dict[str, int] = {}
    out = RetrievalSet([], [], [], [], skips)
    for entry in entries:
        if isinstance(entry, dict) and media not in entry and _OTHER_MEDIA[media] in entry:
            other = _OTHER_MEDIA[media]
            raise DataError(f"{path}: entries name {other!r} files, not {media!r}: an {other}-text "
                             f"file read as {media}-text (set {_ROOT_KEY[other]} for it, not "
                             f"{_ROOT_KEY[media]})")
        if not isinstance(entry, dict) or not isinstance(entry.get(media), str):
            skips[BAD_ENTRY] += 1
            continue
        captions = entry.get("caption")
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            skips[BAD_ENTRY] += 1
            continue
        media_path = os.path.join(root, entry[media])
        if media_path not in media_index:
            if not os.path.isfile(media_path):
                skips[_MISSING_FILE[media]] += 1
                continue
            media_index[media_path] = len(out.images)
            out.images.append(media_path)
            out.img2txt.append([])
        i = media_index[media_path]
        for c in captions:
            text = pre_caption(c, max_words)
            if not text:
                skips[EMPTY_CAPTION] += 1
                continue
            out.img2txt[i].append(len(out.texts))
            out.txt2img.append(i)
            out.texts.append(text)
    no_caption = [i for i, t in enumerate(out.img2txt) if not t]
    if no_caption:  # all its captions were empty (counted above): it cannot be retrieved
        keep = [i for i in range(len(out.images)) if out.img2txt[i]]
        remap = {old: new for new, old in enumerate(keep)}
        out.images = [out.images[i] for i in keep]
        out.img2txt = [out.img2txt[i] for i in keep]
        out.txt2img = [remap[i] for i in out.txt2img]
    _log_skips(f"{media} retrieval", path, skips)
    return out


@dataclass
class VQAItem:
    question_id: int
    question: str                 # pre_question'ed
    answers: list[str]            # the human answers as written ([] for a test question)
    image: str                    # absolute path
    answer_type: str | None = None
    source: str = "vqa"           # the entry's "dataset": vqa | vg


def load_vqa(paths: list[str], image_roots: dict[str, str], *, need_answers: bool,
             max_words: int = 50) -> tuple[list[VQAItem], Counter]:
    """Entries of several files (train + val + VG), image paths under image_roots[entry["dataset"]]
    ("vqa" when absent). With need_answers, a question without answers is skipped (`no_answers`);
    a test split keeps every question (the result file must cover them all)."""
    skips: Counter = Counter()
    items: list[VQAItem] = []
    for path in paths:
        before = Counter(skips)
        for entry in read_json_list(path):
            item = _vqa_item(entry, image_roots, need_answers, max_words, skips)
            if item is not None:
                items.append(item)
        _log_skips("vqa", path, skips - before)
    return items, skips


def _vqa_item(entry, image_roots, need_answers, max_words, skips) -> VQAItem | None:
    if (not isinstance(entry, dict) or not isinstance(entry.get("question"), str)
            or not isinstance(entry.get("image"), str) or "question_id" not in entry):
        skips[BAD_ENTRY] += 1
        return None
    root = image_roots.get(entry.get("dataset", "vqa"))
    if root is None:
        skips[UNKNOWN_VQA_SOURCE] += 1
        return None
    answers = entry.get("answer", [])
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        skips[BAD_ENTRY] += 1
        return None
    if need_answers and not answers:
        skips[NO_ANSWERS] += 1
        return None
    image_path = os.path.join(root, entry["image"])
    if not os.path.isfile(image_path):
        skips[MISSING_IMAGE_FILE] += 1
        return None
    try:
        question_id = int(entry["question_id"])
    except (TypeError, ValueError):
        skips[BAD_ENTRY] += 1
        return None
    return VQAItem(question_id, pre_question(entry["question"], max_words), answers, image_path,
                   entry.get("answer_type"), entry.get("dataset", "vqa"))


@dataclass
class NLVR2Item:
    left: str
    right: str
    sentence: str     # pre_caption'ed
    label: int        # 1 = True


def load_nlvr2(path: str, image_root: str, max_words: int = 30) -> tuple[list[NLVR2Item], Counter]:
    skips: Counter = Counter()
    items: list[NLVR2Item] = []
    for entry in read_json_list(path):
        images = entry.get("images") if isinstance(entry, dict) else None
        if (not isinstance(images, list) or len(images) != 2
                or not all(isinstance(p, str) for p in images)
                or not isinstance(entry.get("sentence"), str)):
            skips[BAD_ENTRY] += 1
            continue
        if entry.get("label") not in NLVR2_LABELS:
            skips[UNKNOWN_LABEL] += 1
            continue
        left, right = (os.path.join(image_root, p) for p in images)
        if not (os.path.isfile(left) and os.path.isfile(right)):
            skips[MISSING_IMAGE_FILE] += 1
            continue
        sentence = pre_caption(entry["sentence"], max_words)
        if not sentence:
            skips[EMPTY_CAPTION] += 1
            continue
        items.append(NLVR2Item(left, right, sentence, NLVR2_LABELS[entry["label"]]))
    _log_skips("nlvr2", path, skips)
    return items, skips
