"""The data layer, file by file in the order a sample flows through it (-> what flows out).

Pre-training, from shards on disk to the batches the trainer steps on:
  shards.py        data.train_shards patterns -> shard URLs, sizes; a shard -> raw samples in file order
  index.py         a shard's member index (SHARD.tar.idx): sample -> its members' offsets and sizes
  stats.py         stats.json: samples and bytes per shard, read at start instead of counting
  sources.py       sources + weights -> the epoch's virtual sequence of shard segments
  order.py         virtual sequence -> the epoch's global order: position -> (shard, index), world-free
  mixing.py        a global order, planned: shards and sources per global batch, a worker's reads
  modality.py      optimizer step -> the modality (image | video) it reads; a source -> its modality
  reader.py        (shard, index) -> raw sample, one open handle per shard
  decode_image.py  raw sample -> Decoded: RGB image (JPEG-drafted), caption, image id | skip reason
  decode_video.py  raw sample -> DecodedVideo: uint8 (T, 3, H, W) sampled frames, caption, id | skip
  transforms.py    image or clip -> uint8 crop (3, S, S) / (T, 3, S, S); the JPEG draft size
  text.py          captions -> token ids; the MLM and SCL text masks
  collate.py       decoded samples + per-sample seeds -> PretrainBatch
  stream.py        one worker's pipeline: rank share -> read -> decode -> fill bad slots -> collate
  loader.py        TrainLoader / EvalLoader: batches out of DataLoader workers, resumable state
  mixed.py         MixedTrainLoader: one stream per modality, one modality per optimizer step
  build.py         the factories: data config -> loaders (pre-training and tasks)
  fingerprint.py   the sample order's inputs -> what a checkpoint's data state must match (shards by name)

Fine-tuning, from annotation files to task batches:
  annotations.py   annotation JSON/JSONL + media root -> task items (retrieval, VQA, NLVR2)
  task_data.py     items -> TaskDataset (decoded files) -> TaskCollator -> TaskBatch; TaskLoader
  classification.py  an ImageFolder tree or shards with a class field -> labelled images (zero-shot)

Written down once, used throughout:
  batch.py         the batch contract: every key of PretrainBatch and TaskBatch, dtype and shape
  skips.py         every skip reason, ordered, with its meaning
  seeds.py         derive_seed: the seed of every random draw
  writer.py        samples -> shards + stats.json (the tools write shards with it)
"""
from megavl.data.batch import PretrainBatch, TaskBatch
from megavl.data.build import (build_eval_loader, build_task_collators, build_task_loader,
                               build_train_loader, size_val_shards)
from megavl.data.loader import EvalLoader, TrainLoader
from megavl.data.mixed import MixedTrainLoader
from megavl.data.skips import SKIP_REASONS, TASK_SKIP_REASONS
from megavl.data.text import build_tokenizer

__all__ = ["SKIP_REASONS", "TASK_SKIP_REASONS", "EvalLoader", "MixedTrainLoader", "PretrainBatch",
           "TaskBatch", "TrainLoader", "build_eval_loader", "build_task_collators", "build_task_loader",
           "build_train_loader", "build_tokenizer", "size_val_shards"]
