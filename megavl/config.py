"""Typed configuration: one dataclass per part, loaded from a YAML recipe plus dotted overrides.

    cfg = load_config("configs/tiny.yaml", ["model.fusion.depth=4 run.max_steps=10"])

Every key is checked at load: an unknown key, a wrong type or an inconsistent value raises
`ConfigError` naming the dotted key and what was expected. Values in recipes may carry their
source in a YAML comment; the dataclass defaults are the ViT-B/16 + BERT-base settings.

The parts live in megavl/config_parts.py and their checks in megavl/config_checks.py; this module
loads a recipe into them and re-exports both, so callers import everything from megavl.config.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megavl.config_checks import (VISION_ACTS, VISION_INIT_FORMATS, VISION_INIT_SUFFIXES, ConfigError,
                                  _check, validate)
from megavl.config_parts import (OBJECTIVE_NAMES, Config, CurriculumConfig, DataConfig,
                                 DecoderConfig, FusionConfig, ITCConfig, ITMConfig, MaskingConfig,
                                 MIMPixelConfig, MIMSemanticConfig, MLMConfig, ModelConfig, ObjectivesConfig,
                                 OptimConfig, RunConfig, SCLConfig, TaskConfig, TeacherConfig, TextConfig,
                                 VisionConfig)

__all__ = [
    "Config", "ModelConfig", "VisionConfig", "TextConfig", "FusionConfig", "DecoderConfig", "DataConfig",
    "ObjectivesConfig", "MaskingConfig", "TeacherConfig", "ITCConfig", "ITMConfig", "MLMConfig",
    "MIMPixelConfig", "MIMSemanticConfig", "SCLConfig", "OptimConfig", "CurriculumConfig", "RunConfig",
    "TaskConfig", "OBJECTIVE_NAMES", "VISION_ACTS", "VISION_INIT_FORMATS",
    "VISION_INIT_SUFFIXES", "ConfigError", "validate", "load_config", "config_from_dict", "config_from_saved",
    "to_dict", "split_overrides", "apply_overrides",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- text tower from HF config.json
# TextConfig field -> Hugging Face BertConfig key.
_HF_TEXT_FIELDS = {"vocab_size": "vocab_size", "width": "hidden_size", "depth": "num_hidden_layers",
                   "heads": "num_attention_heads", "intermediate": "intermediate_size",
                   "max_position": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
                   "hidden_act": "hidden_act", "layer_norm_eps": "layer_norm_eps",
                   "dropout": "hidden_dropout_prob", "attn_dropout": "attention_probs_dropout_prob",
                   "pad_token_id": "pad_token_id"}


def _same_value(recipe: Any, hf: Any) -> bool:
    if isinstance(hf, float) and not isinstance(recipe, bool):
        try:
            return float(recipe) == hf  # YAML 1.1 reads "1e-12" as a string
        except (TypeError, ValueError):
            return False
    return recipe == hf


def _text_from_hf(data: dict) -> dict:
    """With model.text.hf_path set, fill the text-tower fields the recipe leaves out from the HF
    config.json, and refuse any it sets to a different value (the FLOP count and an exported model's
    rebuild read these fields, so they must describe the tower that is actually loaded).

    A directory that is not there leaves the recipe's fields as written: a resumed run or one
    started from task.init_from never reads it, and a run that does stops when it builds the model
    (models/vlp.py), naming the key."""
    text = data.get("model", {}).get("text", {}) if isinstance(data.get("model"), dict) else {}
    if not isinstance(text, dict) or not text.get("hf_path"):
        return data
    config_json = Path(text["hf_path"]) / "config.json"
    if not config_json.is_file():
        log.warning("model.text.hf_path=%s has no config.json: only a run that starts from these weights "
                    "needs it", text["hf_path"])
        return data
    hf = json.loads(config_json.read_text())
    _check(hf.get("model_type", "bert") == "bert", "model.text.hf_path",
           f"a BERT checkpoint (model_type bert in {config_json})", hf.get("model_type"))
    for ours, theirs in _HF_TEXT_FIELDS.items():
        if theirs not in hf:
            continue
        if ours not in text:
            text[ours] = hf[theirs]
        elif not _same_value(text[ours], hf[theirs]):
            raise ConfigError(f"model.text.{ours}: the recipe says {text[ours]!r} but {config_json} has "
                              f"{theirs}={hf[theirs]!r}; remove the key or make them agree")
    return data


# ---------------------------------------------------------------------------- loading from dicts
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"a mapping of {tp.__name__} fields", value)
        return _from_dict(tp, value, key)
    if origin is list:
        _check(isinstance(value, list), key, f"a list ({_type_name(tp)})", value)
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is str:
        _check(isinstance(value, str), key, "a string", value)
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"{prefix + '.' if prefix else ''}{unknown[0]}: unknown key in {where}; "
                          f"expected one of {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------ overrides
def _field_type(key: str) -> Any:
    """The annotation of a dotted key in Config, or ConfigError for an unknown key."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"{key}: unknown key ({part!r} is not a field of {where}; "
                              f"expected one of {sorted(hints)})")
        cls = hints[part]
    return cls


def _parse_value(raw: str, tp: Any) -> Any:
    """Strings stay verbatim (brace patterns like a/{000..009}.tar must not become YAML mappings);
    a list of strings accepts one pattern or a YAML list; everything else is parsed as YAML."""
    if tp is str:
        return raw
    if tp is float:
        try:
            return float(raw)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            pass
    if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        return _parse_str_list(raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse value {raw!r}: {err}") from None


def _parse_str_list(raw: str) -> list[str]:
    """'a-{0..9}.tar' -> ['a-{0..9}.tar']; '[a-{0..1}.tar, b.tar]' -> two items (commas inside braces kept)."""
    raw = raw.strip()
    if not raw.startswith("["):
        return [raw]
    if not raw.endswith("]"):
        raise ConfigError(f"cannot parse list {raw!r}: missing ']'")
    items, depth, current = [], 0, ""
    for ch in raw[1:-1]:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [item.strip().strip("'\"") for item in items if item.strip()]


def split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    """['a.b=1 c=2', 'd=[1, 2]'] -> [('a.b', '1'), ('c', '2'), ('d', '[1, 2]')].

    Each --set argument may hold several space-separated key=value pairs (shell-quoted values
    keep their spaces); a token without '=' continues the previous value (e.g. YAML lists).
    """
    pairs: list[tuple[str, str]] = []
    for arg in overrides:
        for token in shlex.split(arg):
            key, sep, value = token.partition("=")
            if sep and key and "[" not in key and " " not in key:
                pairs.append((key.strip(), value))
            elif pairs:
                pairs[-1] = (pairs[-1][0], pairs[-1][1] + " " + token)
            else:
                raise ConfigError(f"override {token!r}: expected key=value")
    return pairs


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for key, raw in split_overrides(overrides):
        value = _parse_value(raw, _field_type(key))
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        node[leaf] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when path is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    return validate(_from_dict(Config, _text_from_hf(data)))


def config_from_dict(data: dict) -> Config:
    """A recipe given as a dict: as load_config, without the file and overrides."""
    return validate(_from_dict(Config, _text_from_hf(data)))


def config_from_saved(data: dict) -> Config:
    """The config a run wrote (config.yaml of a checkpoint or an export). Every field is explicit
    there, the text tower's included, so its init files (model.vision.init, model.text.hf_path) are
    neither read nor required: they may have moved since, or live on another cluster."""
    return validate(_from_dict(Config, data))
