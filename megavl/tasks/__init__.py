"""Downstream tasks and their evaluation (engine -> tasks -> objectives, models, data).

`metrics.py` holds the metric functions (retrieval here; VQA's are appended by the VQA task);
`retrieval_eval.py` the sharded, batched ITC + ITM retrieval scoring that pre-training's periodic
evaluation and the fine-tuned retrieval task share.
"""
