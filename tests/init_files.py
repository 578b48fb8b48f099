"""Real initial-weight files shaped like a recipe's towers, written to a test's tmp_path: a timm ViT
state dict in DeiT's release layout (model.vision.init, init_format timm) and a Hugging Face BERT
directory (model.text.hf_path). Random weights from timm and transformers themselves; no hub access.

Test files import it as `init_files` (tests/ is on sys.path, as for launch_helpers)."""
from __future__ import annotations

from pathlib import Path

import torch

from megavl.config import TextConfig, VisionConfig


def timm_vit_file(path: Path, vision: VisionConfig, seed: int = 0) -> str:
    """A timm VisionTransformer with `vision`'s shape, saved as {"model": state} (a DeiT .pth)."""
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=vision.img_size,
                            patch_size=vision.patch_size, embed_dim=vision.width, depth=vision.depth,
                            num_heads=vision.heads, mlp_ratio=vision.mlp_ratio)
    torch.save({"model": vit.state_dict()}, path)
    return str(path)


def bert_dir(path: Path, text: TextConfig, dropout: float = 0.1, seed: int = 0) -> str:
    """A transformers BertModel with `text`'s shape and BERT's dropout, saved with save_pretrained."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=text.vocab_size, hidden_size=text.width, num_hidden_layers=text.depth,
                        num_attention_heads=text.heads, intermediate_size=text.intermediate,
                        max_position_embeddings=text.max_position, type_vocab_size=text.type_vocab_size,
                        layer_norm_eps=text.layer_norm_eps, hidden_act=text.hidden_act,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    return str(path)
