"""Webdataset pipeline: shards -> world-independent global order -> rank share -> decode ->
transforms -> batch (plan.py, order.py, stream.py, reader.py, decode.py, collate.py).

Public API (what the trainer calls):
  build_train_loader(cfg, *, rank, world_size, mlm_prob, scl_mask_prob, global_batch_size=0,
                     epoch_start_state=None)       state dict format: loader.py (one
                     modality) or mixed.py (image and video sources: one modality per step, modality.py)
  build_eval_loader(cfg, *, rank, world_size)
  build_tokenizer(path_or_empty)
The batch dict is documented in collate.py, the skip reasons in decode.py.
"""
from megavl.data.modality import SKIP_REASONS  # images' and videos' (+ wrong_modality)
from megavl.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from megavl.data.text import build_tokenizer

__all__ = ["SKIP_REASONS", "EvalLoader", "TrainLoader", "build_eval_loader", "build_train_loader",
           "build_tokenizer"]
