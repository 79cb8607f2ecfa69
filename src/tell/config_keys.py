"""Config keys: dotted names ('train.lr') for the fields of nested config dataclasses, type-checked values
set on them, and the dotted key -> value map (with line numbers) of a YAML file.

config.py builds its RunConfig from these; this module knows no stage's settings, so it imports none.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

import yaml

from tell.data import TellInputError

RUNTIME = "runtime"  # a run's record of the machine, dtype and kernels that ran: written, never read back


def flat_fields(cfg: object, prefix: str = "") -> dict[str, tuple[object, dataclasses.Field]]:
    """Return {'section.field': (owner dataclass instance, Field)} for every leaf field."""
    out = {}
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, f"{prefix}{f.name}."))
        else:
            f.type = hints[f.name]
            out[f"{prefix}{f.name}"] = (cfg, f)
    return out


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"


def coerce(value: object, typ: type, key: str, where: str = "") -> object:
    """Return `value` converted to the field type, or raise naming the key."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int and isinstance(value, str) and "e" in value.lower():
            value = float(value)  # '1e6' on the command line or in YAML (PyYAML reads 1e6 as text)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if typ in (int, float) and isinstance(value, bool):
            raise ValueError
        if typ is str and (value is None or not isinstance(value, (str, int, float))):
            raise ValueError  # str(None) would silently become the text 'None' (e.g. a YAML `text:`)
        return typ(value)
    except (TypeError, ValueError):
        raise TellInputError(f"'{key}' must be {typ.__name__}, got {value!r}", where or None) from None


def apply_overrides(cfg, overrides: dict[str, object], where: str = "",
                    lines: dict[str, int] | None = None):
    """Set dotted keys on cfg (in place) after type checks; unknown keys get a did-you-mean."""
    fields = flat_fields(cfg)
    for key, value in overrides.items():
        line = (lines or {}).get(key)
        if key not in fields:
            raise TellInputError(f"unknown config key '{key}'" + _suggest(key, fields), where or None, line)
        owner, f = fields[key]
        try:
            setattr(owner, f.name, coerce(value, f.type, key))
        except TellInputError as err:
            raise TellInputError(str(err), where or None, line) from None
    return cfg


def _yaml_flat(node, prefix="") -> dict[str, tuple[object, int]]:
    """Flatten a composed YAML mapping to {'a.b': (python value, line)}."""
    out = {}
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        if isinstance(value_node, yaml.MappingNode):
            out.update(_yaml_flat(value_node, key + "."))
        else:
            # Construct the node directly: serialising an empty value (`text:`) gives '...', which no loader reads.
            value = yaml.constructor.SafeConstructor().construct_object(value_node, deep=True)
            out[key] = (value, key_node.start_mark.line + 1)
    return out


def load_yaml_overrides(path: str | Path) -> tuple[dict[str, object], dict[str, int]]:
    """Return the dotted key → value map of a YAML config and the line of each key."""
    path = Path(path)
    if not path.is_file():
        raise TellInputError("config file not found", path)
    try:
        node = yaml.compose(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", -1) + 1
        raise TellInputError(f"malformed YAML: {getattr(err, 'problem', err)}", path, line or None) from None
    if node is None:
        return {}, {}
    if not isinstance(node, yaml.MappingNode):
        raise TellInputError("a config file must be a mapping of sections", path, 1)
    flat = {k: v for k, v in _yaml_flat(node).items() if not k.startswith(RUNTIME + ".")}  # a run's config.yaml
    return {k: v for k, (v, _) in flat.items()}, {k: line for k, (_, line) in flat.items()}
