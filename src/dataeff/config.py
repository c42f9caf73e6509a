"""Typed configs: dataclasses are the single source of truth; YAML files and dotted CLI overrides fill them.

Every field is declared with :func:`option`, which carries its help text, so ``--help`` can document every
field with its default. Unknown keys, wrong types and bad choices are refused with one line that names the
file, the line and the field, and suggests the closest valid key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_write_text

T = TypeVar("T")


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           above: float | None = None, below: float | None = None) -> Any:
    """A dataclass field with a default and a help text (mutable defaults are copied per instance).

    ``min``/``max`` bound a number inclusively, ``above``/``below`` exclusively; a value outside is refused with
    the field's name and where it was set (None, for an optional field, always passes).
    """
    bounds = {k: v for k, v in (("min", min), ("max", max), ("above", above), ("below", below)) if v is not None}
    metadata = {"help": help, **({"bounds": bounds} if bounds else {})}
    if isinstance(default, list | dict):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _check_bounds(value: Any, bounds: dict[str, float], path: str, where: str) -> None:
    numbers = value if isinstance(value, list | tuple) else [value]
    for v in numbers:
        if v is None or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        for kind, limit in bounds.items():
            ok = {"min": v >= limit, "max": v <= limit, "above": v > limit, "below": v < limit}[kind]
            if not ok:
                shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
                rule = {"min": f">= {shown}", "max": f"<= {shown}", "above": f"> {shown}", "below": f"< {shown}"}[kind]
                raise DataeffError(f"{where}: field '{path}': {v!r} must be {rule}")


def section(cls: type, help: str) -> Any:
    """A nested config section."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


# ---------------------------------------------------------------------------------------------------------
# YAML with line numbers


def _yaml_lines(text: str) -> dict[str, int]:
    """Map dotted key paths of a YAML mapping to their 1-based line numbers."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}{key_node.value}"
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path + ".")

    if root is not None:
        walk(root, "")
    return lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping, naming both lines (PyYAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (lines {seen[key]} and {line})",
                                                    key_node.start_mark)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping; return it with the line number of every key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataeffError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise DataeffError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds only plain data
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DataeffError(f"{path}{where}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DataeffError(f"{path}:1: expected a mapping of config keys, got {type(data).__name__}")
    return data, _yaml_lines(text)


# ---------------------------------------------------------------------------------------------------------
# dict -> dataclass


class _Where:
    """Where a value came from, to name it in errors."""

    def __init__(self, source: str, lines: dict[str, int] | None):
        self.source = source
        self.lines = lines or {}

    def __call__(self, path: str) -> str:
        line = self.lines.get(path)
        return f"{self.source}:{line}" if line else self.source


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, where: _Where) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path, where)
            except DataeffError as e:
                errors.append(str(e))
        raise DataeffError(errors[0] if len(errors) == 1 else f"{where(path)}: field '{path}': got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataeffError(f"{where(path)}: field '{path}': {value!r} is not one of {choices}{hint}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DataeffError(f"{where(path)}: field '{path}' is a section; expected a mapping, got {value!r}")
        return _from_dict(tp, value, path + ".", where)
    if origin in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise DataeffError(f"{where(path)}: field '{path}': expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, f"{path}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise DataeffError(f"{where(path)}: field '{path}': expected a mapping, got {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, item, f"{path}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise DataeffError(f"{where(path)}: field '{path}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise DataeffError(f"{where(path)}: field '{path}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise DataeffError(f"{where(path)}: field '{path}': expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise DataeffError(f"{where(path)}: field '{path}': expected a number, got {value!r}")
        # No setting means anything at NaN or infinity; they only ever arrive by mistake.
        if not math.isfinite(number):
            raise DataeffError(f"{where(path)}: field '{path}': {value!r} is not a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise DataeffError(f"{where(path)}: field '{path}': expected a string, got {value!r}")
    return value


def _closest(key: str, valid: list[str]) -> str | None:
    """The valid key a user most likely meant: a near spelling, or an abbreviation (learning_rate -> lr)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return close[0]
    initials = "".join(part[:1] for part in key.split("_"))
    for candidate in valid:
        if candidate == initials or (len(candidate) > 2 and (candidate in key or key in candidate)):
            return candidate
    return None


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str, where: _Where) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            valid = list(fields)
            close = _closest(str(key), valid)
            hint = f"; did you mean '{prefix}{close}'?" if close else f"; valid keys here: {', '.join(valid)}"
            raise DataeffError(f"{where(path)}: unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(value, hints[key], path, where)
        if "bounds" in fields[key].metadata:
            _check_bounds(kwargs[key], fields[key].metadata["bounds"], path, where(path))
    missing = [name for name, f in fields.items() if name not in kwargs and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DataeffError(f"{where(prefix + missing[0])}: field '{prefix}{missing[0]}' is missing")
    try:
        obj = cls(**kwargs)
    except DataeffError:
        raise
    except (TypeError, ValueError) as e:
        raise DataeffError(f"{where(prefix.rstrip('.'))}: invalid config section '{prefix.rstrip('.') or cls.__name__}': {e}") from None
    return obj


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "<config>", lines: dict[str, int] | None = None,
              prefix: str = "") -> T:
    """Build ``cls`` from a nested mapping, refusing unknown keys and ill-typed values. Errors name fields by
    their dotted path, after ``prefix`` when the mapping is a part of a larger document."""
    if not isinstance(data, dict):
        raise DataeffError(f"{source}: {('field ' + repr(prefix.rstrip('.'))) if prefix else 'document'}: expected a "
                           f"mapping, got {type(data).__name__}")
    return _from_dict(cls, data, prefix, _Where(source, lines))


def to_dict(obj: Any) -> Any:
    """A plain nested mapping of a config (tuples become lists) fit for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def non_default(obj: Any) -> dict[str, Any]:
    """The fields of a config that differ from their defaults, nested sections included (emptied ones dropped).

    Identities built from this survive new fields: a field added with a default leaves every existing identity
    as it was. Changing a default silently changes what an identity means, so the identities built from this
    carry a version that is bumped whenever a default changes.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            nested = non_default(value)
            if nested:
                out[f.name] = nested
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if default is dataclasses.MISSING or to_dict(value) != to_dict(default):
            out[f.name] = to_dict(value)
    return out


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` for dotted keys: ``replace(cfg, **{"optim.lr": 1e-3})``."""
    data = to_dict(obj)
    merge(data, unflatten(changes))
    return from_dict(type(obj), data)


# ---------------------------------------------------------------------------------------------------------
# overrides, loading, dumping, hashing


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DataeffError(f"override '{dotted}': '{p}' is set both as a value and as a section")
        node[leaf] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse ``a.b=value`` strings (values read as YAML scalars or lists) into a nested mapping."""
    flat: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise DataeffError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            if raw.lstrip().startswith(("[", "{")):
                # A list or mapping that does not parse must not become one string holding its brackets.
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise DataeffError(f"override {key.strip()}={raw!r}: not a valid list or mapping ({problem})") from None
            value = raw
        flat[key.strip()] = value
    return unflatten(flat)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``over`` into ``base`` in place."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults, then the YAML file, then dotted overrides."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        data, lines = read_yaml(path)
        source = str(path)
    if overrides:
        over = parse_overrides(overrides)
        # Checked alone first, so a bad override is blamed on the command line, not on the file.
        from_dict(cls, over, source="<command line>")
        merge(data, over)
    return from_dict(cls, data, source=source, lines=lines)


def dump_yaml(obj: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def config_hash(obj: Any, length: int = 12) -> str:
    """A stable content hash of a config (key order and tuple/list spelling do not matter)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, help) for every leaf field, for ``--help``."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    instance = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        origin = typing.get_origin(tp)
        choices = ""
        if origin is Literal:
            choices = " {" + "|".join(str(a) for a in typing.get_args(tp)) + "}"
        rows.append((f"{prefix}{f.name}", json.dumps(to_dict(value), default=str), f.metadata.get("help", "") + choices))
    return rows


def help_text(cls: type) -> str:
    rows = describe(cls)
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {help}  [default: {default}]" for name, default, help in rows)
