"""The batch contract: every key a batch of the data layer carries, with its dtype and shape.

Legend: B batch rows, S = data.image_size, T = data.num_frames (a clip), N images per item (NLVR2:
2), L = data.max_text_len (text is always padded to exactly L), C VQA answer classes.

Pre-training (collate.Collator, through TrainLoader / MixedTrainLoader / EvalLoader): one modality
per batch, so `images` is either images or clips.
  images          float32 (B, 3, S, S) | (B, T, 3, S, S)   normalised pixels (a video step: clips)
  input_ids       int64   (B, L)   [CLS] caption [SEP] [PAD]...
  attention_mask  int64   (B, L)   1 = real token
  mlm_input_ids   int64   (B, L)   BERT 80/10/10 masked ids
  mlm_labels      int64   (B, L)   original id where MLM-masked, -100 (text.IGNORE_INDEX) elsewhere
  scl_input_ids   int64   (B, L)   SCL: non-special tokens -> [MASK] with scl_mask_prob
  keys            list[str] (B)    sample keys (`__key__` of the shard members)
  image_ids       int64   (B,)     same id = same image or clip (ITC/ITM/SCL positives)
The trainer adds device-side keys of its own (images_fp32, mlm_count); they are not data.

Fine-tuning (task_data.TaskCollator, through TaskLoader): the keys every task batch carries, then
the task's own fields (`to_fields` of its items), each stacked over the batch; a task that adds a
field adds it here.
  images          float32 (B, 3, S, S) | (B, N, 3, S, S) | (B, T, 3, S, S)
  index           int64   (B,)     the item's index in the dataset
  valid           bool    (B,)     False on the padding rows of an evaluation batch
  input_ids       int64   (B, L)   items with text
  attention_mask  int64   (B, L)   items with text
  image_index     int64   (B,)     retrieval training: the image of the caption (positives)
  target          float32 (B, C)   VQA training: soft answer scores
  label           int64   (B,)     NLVR2: 1 = the sentence is true of the pair

`SPECS` writes each key's dtype and allowed shapes down once; `conforms` checks a batch against it
(the data tests run it on real collated batches).
"""
# No `from __future__ import annotations` here: TypedDict reads NotRequired from live annotations.
from dataclasses import dataclass
from typing import NotRequired, TypedDict

import torch

Shape = tuple  # of ints (sizes) and legend letters  # a dimension is a size or a legend letter


class PretrainBatch(TypedDict):
    """A pre-training batch (see the module docstring)."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mlm_input_ids: torch.Tensor
    mlm_labels: torch.Tensor
    scl_input_ids: torch.Tensor
    keys: list[str]
    image_ids: torch.Tensor


class TaskBatch(TypedDict):
    """A fine-tuning batch (see the module docstring): the keys of every task, then each task's own."""

    images: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    input_ids: NotRequired[torch.Tensor]
    attention_mask: NotRequired[torch.Tensor]
    image_index: NotRequired[torch.Tensor]
    target: NotRequired[torch.Tensor]
    label: NotRequired[torch.Tensor]


@dataclass(frozen=True)
class Spec:
    """A key's dtype (`str` for a list of strings) and the shapes it may take."""

    dtype: torch.dtype | type
    shapes: tuple[Shape, ...]


_TEXT = Spec(torch.int64, (("B", "L"),))
SPECS: dict[str, Spec] = {
    "images": Spec(torch.float32, (("B", 3, "S", "S"), ("B", "T", 3, "S", "S"),
                                   ("B", "N", 3, "S", "S"))),
    "input_ids": _TEXT,
    "attention_mask": _TEXT,
    "mlm_input_ids": _TEXT,
    "mlm_labels": _TEXT,
    "scl_input_ids": _TEXT,
    "keys": Spec(str, (("B",),)),
    "image_ids": Spec(torch.int64, (("B",),)),
    "index": Spec(torch.int64, (("B",),)),
    "valid": Spec(torch.bool, (("B",),)),
    "image_index": Spec(torch.int64, (("B",),)),
    "target": Spec(torch.float32, (("B", "C"),)),
    "label": Spec(torch.int64, (("B",),)),
}


def conforms(batch: dict, contract: type, **dims: int) -> list[str]:
    """What is wrong with `batch` as a `contract` (PretrainBatch or TaskBatch): missing keys, keys
    the contract does not name (a new task field belongs in TaskBatch and SPECS first), and every
    key's dtype or shape against SPECS. `dims` binds legend letters (S=224, L=30, ...); letters not
    given bind on first use and must then agree. [] = the batch conforms."""
    problems = [f"missing key {k!r}" for k in sorted(contract.__required_keys__ - set(batch))]
    problems += [f"key {k!r} is not in the contract"
                 for k in sorted(set(batch) - set(contract.__annotations__))]
    bound = dict(dims)
    for key, value in batch.items():
        spec = SPECS.get(key)
        if spec is None:
            continue
        if spec.dtype is str:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                problems.append(f"{key}: expected a list of str, got {type(value).__name__}")
                continue
            shape: tuple[int, ...] = (len(value),)
        elif not torch.is_tensor(value):
            problems.append(f"{key}: expected a tensor, got {type(value).__name__}")
            continue
        else:
            shape = tuple(value.shape)
            if value.dtype != spec.dtype:
                problems.append(f"{key}: dtype {value.dtype}, expected {spec.dtype}")
        fits = (_bind(pattern, shape, bound) for pattern in spec.shapes)
        matched = next((b for b in fits if b is not None), None)
        if matched is None:
            problems.append(f"{key}: shape {shape} is none of {list(spec.shapes)} with {bound}")
        else:
            bound = matched
    return problems


def _bind(pattern: Shape, shape: tuple[int, ...], bound: dict[str, int]) -> dict[str, int] | None:
    """`bound` extended by the letters of `pattern` that `shape` fixes, or None if it does not fit."""
    if len(pattern) != len(shape):
        return None
    out = dict(bound)
    for want, got in zip(pattern, shape):
        if isinstance(want, int):
            if want != got:
                return None
        elif out.setdefault(want, got) != got:
            return None
    return out
