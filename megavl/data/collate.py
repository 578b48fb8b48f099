"""Decoded samples -> the pre-training batch every objective reads (PretrainBatch, batch.py).

Images and clips go through the transform (one crop/flip per clip), captions through the
tokenizer, then the MLM and SCL masks are drawn; scl_input_ids is read by SCL only when
objectives.scl.text_mask_prob > 0.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from megavl.data.batch import PretrainBatch
from megavl.data.decode_image import Decoded
from megavl.data.seeds import derive_seed
from megavl.data.text import mlm_mask, scl_mask, special_tokens_mask
from megavl.data.transforms import Transform, normalize_batch


class Collator:
    """Transforms images, tokenises captions and draws the text masks from a given seed."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, transform: Transform, mean: list[float],
                 std: list[float], max_text_len: int, mlm_prob: float, scl_mask_prob: float):
        for name, p in (("mlm_prob", mlm_prob), ("scl_mask_prob", scl_mask_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        self.tokenizer = tokenizer
        self.transform = transform
        self.mean, self.std = mean, std
        self.max_text_len = max_text_len
        self.mlm_prob = mlm_prob
        self.scl_mask_prob = scl_mask_prob
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        self.vocab_size = len(tokenizer)

    def __call__(self, samples: list[Decoded], seeds: list[int]) -> PretrainBatch:
        """One batch; `seeds[i]` fixes sample i's augmentation and text masks (the stream derives
        it from (seed, epoch, global position)), so a sample looks the same in any batch layout."""
        if len(seeds) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(seeds)} seeds")
        with torch.random.fork_rng(devices=[]):
            images = []
            for sample, seed in zip(samples, seeds):
                # the CPU generator only: torch.manual_seed also queues a CUDA seed with a captured
                # stack trace per call (4 ms per sample measured), the transforms use the CPU one
                torch.default_generator.manual_seed(seed)
                images.append(self.transform(sample.image))  # uint8
        tokens = self.tokenizer([s.caption for s in samples], padding="max_length", truncation=True,
                                max_length=self.max_text_len, return_tensors="pt")
        input_ids = tokens["input_ids"].long()
        special = special_tokens_mask(input_ids, self.special_ids)
        mask_id = self.tokenizer.mask_token_id
        mlm_rows, label_rows, scl_rows = [], [], []
        for i, seed in enumerate(seeds):  # one generator per sample, rows masked independently
            generator = torch.Generator().manual_seed(derive_seed(seed, "text"))
            ids, sp = input_ids[i:i + 1], special[i:i + 1]
            mlm_ids, labels = mlm_mask(ids, sp, self.mlm_prob, mask_id, self.vocab_size, generator)
            mlm_rows.append(mlm_ids)
            label_rows.append(labels)
            scl_rows.append(scl_mask(ids, sp, self.scl_mask_prob, mask_id, generator))
        return {
            "images": normalize_batch(torch.stack(images), self.mean, self.std),
            "input_ids": input_ids,
            "attention_mask": tokens["attention_mask"].long(),
            "mlm_input_ids": torch.cat(mlm_rows),
            "mlm_labels": torch.cat(label_rows),
            "scl_input_ids": torch.cat(scl_rows),
            "keys": [s.key for s in samples],
            "image_ids": torch.tensor([s.image_id for s in samples], dtype=torch.long),
        }
