"""Loading a run configuration: YAML files and ``key=value`` overrides with dotted keys, checked against the schema.

Unknown keys and wrongly typed values raise :class:`ConfigError` naming the key and listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..errors import ConfigError
from .schema import TrainConfig, to_dict
from .validation import validate

# --- (de)serialisation -----------------------------------------------------------------------------------------------


def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def _type_hints(cls) -> Dict[str, Any]:  # resolving the string annotations is 85 % of loading a config: once per class
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (after YAML parsing), converting int -> float where natural."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in YAML11_BOOLS:  # `compile=yes`, `resident: off`
            return YAML11_BOOLS[value.lower()]
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, bool):  # `true`/`false`: string keys such as channels_last take them as text
            return "true" if value else "false"
        if value is None:  # `amp=null`: the word, for the key's own check to name the valid values
            return "null"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _apply(obj, mapping: Dict[str, Any], prefix: str = "") -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {mapping!r}")
    fields = _fields(type(obj))
    hints = _type_hints(type(obj))
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {full!r}; valid keys{(' of ' + prefix.rstrip('.')) if prefix else ''}: {', '.join(fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))



# YAML 1.1 (PyYAML) reads these words as booleans; ccar's loader reads only true/false so, and a string key keeps
# the word as text (`amp=off`, `sampler: no`...); a boolean key still accepts them (`compile=yes`).
YAML11_BOOLS = {**dict.fromkeys(("yes", "on", "true"), True), **dict.fromkeys(("no", "off", "false"), False)}


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last one
    silently, so a stray second ``out:`` or a method listed twice would quietly replace the first), and that only
    ``true``/``false`` are booleans (YAML 1.2's rule: ``off``, ``no``, ``on``, ``yes`` stay text until a key's type
    says otherwise)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _strict_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> Dict[Any, Any]:
    seen = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping names it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (each key may appear once)",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def load_yaml(path: str) -> Any:
    """A YAML file (config or sweep) as Python data; bad bytes, bad syntax and duplicate keys are ConfigErrors that
    name the file and line."""
    p = Path(path)
    try:
        return yaml.load(p.read_text(), Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file ``path``, then ``key=value`` overrides (``optim.lr=0.05``, ``loss.base=la``)."""
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = load_yaml(path)
        try:
            _apply(cfg, data if data is not None else {})
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    apply_overrides(cfg, overrides)
    return validate(cfg)


def parse_override(item: str) -> tuple:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. loss.name=ce, optim.lr=0.05)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r}") from exc
    return key, value


def apply_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    for item in overrides:
        key, value = parse_override(item)
        nested: Dict[str, Any] = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _apply(cfg, nested)
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
