"""Run configs with stages (e.g. KD then DMD2) for ``distill-mixins train --config <file>``.

A run config is a JSON file (stdlib)::

    {"run_dir": "runs/kd-dmd2", "seed": 0,
     "stages": [{"name": "kd", "method": "kd", "model": "pkg.mod:build_model", "data": "pkg.mod:build_data",
                 "method_config": {...}, "trainer": {...}, "model_args": {...}, "data_args": {...}},
                {"name": "dmd2", "method": "dmd2", ..., "init_from_previous": "student"}]}

``model`` is called as ``factory(method_mixin, distill_config, **model_args)`` and returns the composed model
(e.g. ``compose(method_mixin, MyHost)(<host args>, distill=distill_config)``); ``data`` as
``factory(model, seed=<trainer seed>, **data_args)`` and returns what ``DistillationTrainer`` accepts.
Command-line overrides ``--set stages.0.trainer.iterations=10`` (a list index or a stage name) are applied
to the JSON before it is parsed; values are JSON (``10``, ``true``, ``[1, 2]``) or else plain strings.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from distill_mixins.config import check_choice, config_to_dict
from distill_mixins.errors import ConfigError, MissingFileError, config_errors

METHODS: dict[str, str] = {
    "kd": "distill_mixins.methods.kd:KDMixin",
    "dmd2": "distill_mixins.methods.dmd2:DMD2Mixin",
    "causal_kd": "distill_mixins.methods.causal_kd:CausalKDMixin",
    "self_forcing": "distill_mixins.methods.self_forcing:SelfForcingMixin",
    "refined_kd": "distill_mixins.methods.refined_kd:RefinedKDMixin",
    "scm": "distill_mixins.methods.scm:SCMMixin",
    "rcm": "distill_mixins.methods.rcm:RCMMixin",
}
"""Method name -> ``"module:MixinClass"``; the mixin's ``config_class`` parses ``method_config``.
A new method registers in one line, e.g. ``METHODS["dmd2"] = "distill_mixins.methods.dmd2:DMD2Mixin"``."""

INIT_FROM = ("student", "ema", "none")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def resolve_object(spec: str, what: str = "object") -> Any:
    """The attribute named by ``"package.module:attribute"``; a :class:`ConfigError` (a ValueError) names ``what``."""
    module_name, sep, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what} {spec!r} must look like 'package.module:attribute'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{what} {spec!r}: cannot import module '{module_name}' ({error}).") from error
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what} {spec!r}: module '{module_name}' has no attribute '{attr}'.")
        obj = getattr(obj, part)
    return obj


def method_mixin(name: str) -> type:
    """The method mixin class registered as ``name`` in :data:`METHODS`."""
    check_choice("stage", "method", name, tuple(METHODS))
    return resolve_object(METHODS[name], f"METHODS[{name!r}]")


@functools.cache
def compose(method: type, host: type) -> type:
    """The class ``class <Host><Method>(method, host)``, built once per pair (mixins first, as the MRO needs)."""
    name = f"{host.__name__}{method.__name__.removesuffix('Mixin')}"
    return types.new_class(name, (method, host), exec_body=lambda ns: ns.update({"__module__": host.__module__}))


# --------------------------------------------------------------------- dicts -> dataclasses


def _union_args(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def _accepts_callable(hint: Any) -> bool:
    for arg in _union_args(hint):
        origin = typing.get_origin(arg) or arg
        if origin in (Callable, typing.Callable) or (isinstance(origin, type) and issubclass(origin, nn.Module)):
            return True
    return False


def _convert(hint: Any, value: Any, where: str) -> Any:
    args = _union_args(hint)
    if isinstance(value, dict):
        for arg in args:
            if dataclasses.is_dataclass(arg):
                return build_dataclass(arg, value, where)
    if isinstance(value, str) and str not in args and _accepts_callable(hint):
        return resolve_object(value, where)
    if isinstance(value, list) and any(typing.get_origin(a) is tuple for a in args):
        return tuple(value)
    return value


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


_OWNERS = {"RunConfig": "the run config", "StageConfig": "the stage"}
_EXAMPLES = {
    "run_dir": '"runs/<name>"', "stages": '[{"name": ..., "method": ..., "model": ..., "data": ...}]',
    "name": '"<stage name>"', "model": '"package.module:factory"', "data": '"package.module:factory"',
}


def _example(name: str) -> str:
    if name == "method":
        return " or ".join(f'"{method}"' for method in METHODS)
    return _EXAMPLES.get(name, "<value>")


def _check_required(cls: type, data: dict[str, Any], where: str) -> None:
    """Raise a ConfigError naming the required fields of ``cls`` that ``data`` lacks, and what to add."""
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        add = ", ".join(f'"{name}": {_example(name)}' for name in missing)
        owner = _OWNERS.get(cls.__name__, f"the {cls.__name__}")
        raise ConfigError(f"{_prefix(where)}{', '.join(missing)} {verb} missing; add {add} to {owner}.")


def _check_type(hint: Any, value: Any, where: str) -> None:
    """Raise a ConfigError naming ``where`` when a field typed as a number (or a string) gets something else."""
    kinds = {arg for arg in _union_args(hint) if arg is not type(None)}
    if value is None and len(kinds) < len(_union_args(hint)):
        return
    if kinds and kinds <= {int, float} and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{where}={value!r} must be a number.")
    if kinds == {str} and not isinstance(value, str):
        raise ConfigError(f"{where}={value!r} must be a string.")


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` with nested config dataclasses built from dicts, lists made tuples where the field is a
    tuple, and ``"module:factory"`` strings resolved for network fields.

    Unknown or missing keys, and a value that ``cls`` rejects, raise a :class:`ConfigError` (a ValueError)
    prefixed with ``where`` (e.g. ``stages.0.method_config``)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_prefix(where)}must be a JSON object of {cls.__name__} fields, got {type(data).__name__}."
        )
    data = dict(data)
    kind = data.pop("type", cls.__name__)
    if kind != cls.__name__:
        raise ConfigError(f"{_prefix(where)}is a {kind}, but this stage needs a {cls.__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"{_prefix(where)}{cls.__name__} has no field {', '.join(unknown)}; its fields: {', '.join(names)}."
        )
    _check_required(cls, data, where)
    for key, value in data.items():
        _check_type(hints[key], value, _join(where, key))
    values = {key: _convert(hints[key], value, _join(where, key)) for key, value in data.items()}
    with config_errors(where):
        return cls(**values)


def stage_where(index: int, stage: Any) -> str:
    """``stages.1 ("dmd2")``: the stage's place in the run config, with its name when it has one."""
    name = stage.get("name") if isinstance(stage, dict) else getattr(stage, "name", None)
    return f'stages.{index} ("{name}")' if isinstance(name, str) and name else f"stages.{index}"


# ------------------------------------------------------------------------------ configs


@dataclass
class StageConfig:
    """One stage: a method, the model and data factories, the method and trainer settings.

    ``init_from_previous``: which weights of the previous stage the student starts from (``student``,
    its ``ema``, or ``none``); ignored for the first stage. ``callbacks``: ``"module:factory"`` names, each
    called as ``factory(model, data)`` for a trainer callback. ``parallel``: how the model is spread over the
    processes when the run is launched by ``torchrun`` (``ParallelConfig`` fields).
    """

    name: str
    method: str
    model: str
    data: str
    method_config: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    data_args: dict[str, Any] = field(default_factory=dict)
    callbacks: list[str] = field(default_factory=list)
    init_from_previous: str = "student"
    parallel: dict[str, Any] = field(default_factory=dict)
    """:class:`~distill_mixins.parallel.ParallelConfig` fields, used under several processes (torchrun); empty:
    the defaults (FSDP over every rank)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _STAGE_NAME.match(self.name):
            raise ValueError(f"stage name {self.name!r} must be letters, digits, '_', '-' or '.' (a directory name).")
        check_choice(f"stage {self.name!r}", "method", self.method, tuple(METHODS))
        check_choice(f"stage {self.name!r}", "init_from_previous", self.init_from_previous, INIT_FROM)
        if not isinstance(self.callbacks, list):
            raise ValueError(f"stage {self.name!r} callbacks must be a list of 'package.module:factory' names.")
        specs = {"model": self.model, "data": self.data, **{f"callbacks[{i}]": c for i, c in enumerate(self.callbacks)}}
        for attr, spec in specs.items():
            if not isinstance(spec, str) or spec.count(":") != 1:
                raise ValueError(f"stage {self.name!r} {attr}={spec!r} must look like 'package.module:factory'.")
        for attr in ("method_config", "trainer", "model_args", "data_args", "parallel"):
            if not isinstance(getattr(self, attr), dict):
                raise ValueError(f"stage {self.name!r} {attr} must be a JSON object.")
        if "run_dir" in self.trainer:
            raise ValueError(
                f"stage {self.name!r} trainer.run_dir is set by the run config (<run_dir>/{self.name}); remove it."
            )


@dataclass
class RunConfig:
    """A run directory, a seed (the default trainer seed of every stage) and the stages, in order."""

    run_dir: str
    stages: list[StageConfig]
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise ValueError(f"run config run_dir={self.run_dir!r} must be a non-empty path.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"run config seed={self.seed!r} must be an int >= 0.")
        if not self.stages:
            raise ValueError("run config stages is empty: give at least one stage.")
        if not isinstance(self.stages, list):
            raise ValueError(f"run config stages must be a JSON list of stages, got {type(self.stages).__name__}.")
        self.stages = [s if isinstance(s, StageConfig) else build_dataclass(StageConfig, s, stage_where(i, s))
                       for i, s in enumerate(self.stages)]
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"run config stage names {names} must be unique (each is a directory).")

    def to_dict(self) -> dict[str, Any]:
        """The resolved run config as JSON-ready values."""
        return config_to_dict(self)


def _child(node: Any, key: str, path: str) -> Any:
    if isinstance(node, list):
        if key.lstrip("-").isdigit():
            return int(key)
        for i, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == key:
                return i
        raise ConfigError(f"--set {path}: no list index or stage named '{key}'.")
    if isinstance(node, dict):
        return key
    raise ConfigError(f"--set {path}: '{key}' goes inside a {type(node).__name__}, which has no fields.")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``data`` with each ``dotted.key=value`` applied (missing objects on the way are created)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {item!r} must look like key.path=value, e.g. stages.0.trainer.iterations=10.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        keys, node = path.split("."), data
        for key in keys[:-1]:
            index = _child(node, key, path)
            if isinstance(node, dict) and index not in node:
                node[index] = {}
            try:
                node = node[index]
            except IndexError:
                raise ConfigError(f"--set {path}: index {index} is out of range ({len(node)} entries).") from None
        last = _child(node, keys[-1], path)
        if isinstance(node, list) and not -len(node) <= last < len(node):
            raise ConfigError(f"--set {path}: index {last} is out of range ({len(node)} entries).")
        node[last] = value
    return data


def read_json(path: str | Path, what: str, flag: str) -> Any:
    """The JSON value of file ``path`` (``what``, given with ``flag``); a missing or malformed file raises a
    :class:`~distill_mixins.errors.UsageError` naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise MissingFileError(f"{what} {path} {problem}: give the path of a JSON file with {flag}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{what} {path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): "
            "fix the syntax there."
        ) from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({error.reason}): give a JSON file.") from error


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run config JSON file, apply ``--set`` overrides, validate; errors are :class:`ConfigError`
    (a ValueError) naming the file, the stage and the field, or a :class:`MissingFileError`."""
    data = apply_overrides(read_json(path, "run config", "--config"), overrides)
    try:
        return build_dataclass(RunConfig, data, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
