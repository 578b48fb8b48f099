"""megavl: vision-language pre-training (SemMIM, SCL, SemVLP, MaskVLM, ITC/ITM/MLM) on DeepSpeed."""
from __future__ import annotations

__version__ = "0.1.0"


def load_pretrained(path, strict: bool = True):
    """Load a model exported by `megavl-export` (see megavl.models.pretrained)."""
    from megavl.models.pretrained import load_pretrained as _load

    return _load(path, strict=strict)


__all__ = ["load_pretrained", "__version__"]
