"""Teacher weights from a local diffusers model folder or a single safetensors file (never from a hub).

A folder written by ``save_pretrained`` is loaded with diffusers' own ``from_pretrained`` when ``accelerate`` is
installed. Without it, diffusers 0.42 refuses to load models that keep modules in float32 (Cosmos and Wan both
do: "``low_cpu_mem_usage`` cannot be False when ``keep_in_fp32_modules`` is True"), so the folder's
``config.json`` and safetensors weights (one file or an index of shards) are read here instead, with diffusers'
rules for ignored keys and float32 modules. A single ``.safetensors`` file is always read here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import ModelMixin
from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, is_accelerate_available
from safetensors.torch import load_file

M = TypeVar("M", bound=ModelMixin)

CONFIG_NAME = "config.json"
ConfigSource = Mapping[str, Any] | str | os.PathLike[str] | None


def load_transformer(
    model_class: type[M], path: str | os.PathLike[str], *, config: ConfigSource = None, subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> M:
    """A diffusers transformer of ``model_class`` with the weights at ``path``.

    ``path`` is a local folder written by ``save_pretrained`` (``config.json`` + safetensors; ``subfolder`` e.g.
    ``"transformer"`` inside a pipeline folder), or a ``.safetensors`` file whose architecture comes from
    ``config`` (a dict or a ``config.json`` path; default: the ``config.json`` next to the file). The keys must
    match the model exactly (ValueError naming the missing and unexpected ones). ``torch_dtype`` casts the
    weights, keeping the model's ``_keep_in_fp32_modules`` in float32 as diffusers does. Only local paths are read.
    """
    path = Path(path) / subfolder if subfolder else Path(path)
    if path.is_dir():
        if is_accelerate_available():
            return model_class.from_pretrained(path, torch_dtype=torch_dtype, local_files_only=True)
        config_source = config if config is not None else path / CONFIG_NAME
        return _from_state(model_class, _read_config(config_source, path), _folder_state(path), str(path), torch_dtype)
    if not path.is_file():
        raise FileNotFoundError(
            f"teacher weights {str(path)!r} do not exist: give a local folder written by save_pretrained "
            "(config.json + weights) or a .safetensors file."
        )
    if path.suffix != ".safetensors":
        raise ValueError(f"teacher weights {str(path)!r}: a single file must be a .safetensors file.")
    config_source = config if config is not None else path.with_name(CONFIG_NAME)
    return _from_state(model_class, _read_config(config_source, path), load_file(str(path)), str(path), torch_dtype)


def _from_state(
    model_class: type[M], config: dict[str, Any], state: dict[str, torch.Tensor], source: str,
    torch_dtype: torch.dtype | None,
) -> M:
    model = model_class.from_config(config)
    expected = set(model.state_dict())
    for pattern in model_class._keys_to_ignore_on_load_unexpected or []:  # as diffusers' from_pretrained
        state = {k: v for k, v in state.items() if k in expected or re.search(pattern, k) is None}
    load_state_dict_strict(model, state, source=source)
    return cast_keeping_fp32_modules(model, torch_dtype)


def _read_config(config: Mapping[str, Any] | str | os.PathLike[str], weights: Path) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    config_path = Path(config)
    if not config_path.is_file():
        raise FileNotFoundError(
            f"loading {str(weights)!r} needs the model's architecture: pass config= (a dict or a config.json path); "
            f"{str(config_path)!r} does not exist."
        )
    return json.loads(config_path.read_text())


def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder: ``diffusion_pytorch_model.safetensors`` or its sharded index."""
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        files = [SAFETENSORS_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(
            f"{str(folder)!r} has no {SAFETENSORS_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}; other weight formats "
            "(variants, .bin) load through diffusers' from_pretrained: pip install accelerate."
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def cast_keeping_fp32_modules(model: M, dtype: torch.dtype | None) -> M:
    """``model.to(dtype)``, with the parameters of ``model._keep_in_fp32_modules`` kept in float32 (diffusers' rule:
    a parameter stays float32 when a component of its dotted name is listed)."""
    if dtype is None:
        return model
    half = dtype in (torch.float16, torch.bfloat16)
    keep = (model._keep_in_fp32_modules or []) if half else []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def load_state_dict_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error naming the missing and unexpected keys."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {type(model).__name__}({_config_summary(model)}): "
            f"missing keys {_first(missing)}; unexpected keys {_first(unexpected)}. Check that config= describes the "
            "checkpoint (layer count, widths) and that the file holds this model's weights, not a whole pipeline's."
        )
    model.load_state_dict(state, strict=True)


def _first(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _config_summary(model: torch.nn.Module) -> str:
    config = getattr(model, "config", {})
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels")
    return ", ".join(f"{k}={config[k]}" for k in keys if k in config)


__all__ = ["cast_keeping_fp32_modules", "load_state_dict_strict", "load_transformer"]
