"""Strict manifests: YAML values in, typed frozen dataclasses out.

A manifest is one flat YAML file with one section per stage (``cache_teacher:``, ``fit_svd:``, ...). Loading is
strict: duplicate keys, unknown sections or keys, wrong types and out-of-range values are errors that name the
key and the file. Overrides (CLI flags, ``--set section.key=value``) are applied on top, then the dataclass
validates the result.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import KdepError

# Sections a manifest may hold: one per stage (a section is read only by its stage).
SECTIONS = (
    "demo_data",
    "make_shards",
    "demo_teacher",
    "cache_teacher",
    "fit_svd",
    "train_student",
    "eval",
    "inspect",
    "verify",
    "bench",
    "study",
    "search_process",
)


class ConfigError(KdepError, ValueError):
    """A manifest or override is wrong; the message names the key, the value and the source."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"duplicate key {key!r} at line {line} (first at line {seen[key]})")
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_manifest(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a manifest file into ``{section: {key: value}}``; duplicate keys are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no manifest at {path}; pass an existing file (see manifests/)")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - strict SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(
            f"{path}: a manifest is a mapping of sections (e.g. 'cache_teacher:') to mappings of values"
        )
    for section in data:
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}; allowed sections: {', '.join(SECTIONS)}")
    return data


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """Parse ``section.key=value`` strings (value in YAML syntax) into ``{section: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or not section or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set fit_svd.dim=512")
        out.setdefault(section, {})[key] = yaml.safe_load(raw) if raw != "" else ""
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, nothing else is converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected is a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def build_config(cls: type, values: dict[str, Any], source: str) -> Any:
    """Make the dataclass ``cls`` from ``values``; unknown keys, wrong types and bad values name key and source."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{source}: key {k!r}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{source}: {err}") from None


def resolve_config(
    cls: type,
    section: str,
    manifest: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Any:
    """Manifest section, then CLI flags (those not None), then ``--set`` overrides, validated as ``cls``."""
    values: dict[str, Any] = {}
    source = f"section {section!r}"
    if manifest is not None:
        data = load_manifest(manifest)
        values.update(data.get(section) or {})
        source = f"{manifest}: section {section!r}"
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    overrides = parse_overrides(sets)
    for other in sorted(set(overrides) - {section}):
        raise ConfigError(f"--set {other}.*: this stage reads section {section!r}, not {other!r}")
    values.update(overrides.get(section, {}))
    return build_config(cls, values, source)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def check_range(
    name: str, value: float, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False
) -> None:
    """Raise ConfigError naming ``name`` if ``value`` is outside [lo, hi] (or (lo, hi] with open_lo)."""
    low_bad = lo is not None and (value <= lo if open_lo else value < lo)
    high_bad = hi is not None and value > hi
    if low_bad or high_bad:
        left = "(" if open_lo else "["
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise ConfigError(f"key {name!r}: value {value!r} is out of range {rng}")


def check_choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    """Raise ConfigError naming ``name`` if ``value`` is not one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"key {name!r}: {value!r} is not one of {', '.join(map(repr, choices))}")


def check_choices(config: Any) -> None:
    """Check every field named in ``config.CHOICES`` (each item, for a tuple field) against its choices."""
    for name, choices in getattr(config, "CHOICES", {}).items():
        value = getattr(config, name)
        for item in value if isinstance(value, tuple) else (value,):
            check_choice(name, item, choices)


def field_docs(cls: type) -> dict[str, str]:
    """``{field: its trailing comment}`` for a config dataclass: the comment on a field's line is its help text.

    Comments are not kept at run time, so they are read from the module source with ``tokenize`` (once per
    module); every comment between a field's name and the next field belongs to it, so a wrapped field keeps it."""
    names = {f.name for f in dataclasses.fields(cls)}
    source = inspect.getsourcefile(cls)
    docs = (
        _module_field_docs(source).get(cls.__name__, {}) if source else {}
    )  # no source (a .pyc-only install)
    return {k: v for k, v in docs.items() if k in names}


@functools.cache
def _module_field_docs(path: str) -> dict[str, dict[str, str]]:
    """``{class: {field: comment}}`` for the top-level classes of one source file."""
    out: dict[str, dict[str, list[str]]] = {}
    cls = field = None
    depth, line_start, expect_class = 0, True, False
    with open(path, encoding="utf-8") as fh:
        for tok in tokenize.generate_tokens(fh.readline):
            kind, text, (_, col) = tok.type, tok.string, tok.start
            if kind == tokenize.OP and text in "([{":
                depth += 1
            elif kind == tokenize.OP and text in ")]}":
                depth -= 1
            elif kind == tokenize.NAME and expect_class:
                cls, field, expect_class = text, None, False
                out.setdefault(cls, {})
            elif kind == tokenize.NAME and line_start and depth == 0 and col == 0:
                cls, field, expect_class = None, None, text == "class"
            elif kind == tokenize.NAME and line_start and depth == 0 and col == 4 and cls is not None:
                field = None if text in ("def", "class", "@") else text
            elif kind == tokenize.COMMENT and cls is not None and field is not None:
                out[cls].setdefault(field, []).append(text.lstrip("# ").strip())
            line_start = kind in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT) or (
                line_start and kind == tokenize.COMMENT
            )
    return {c: {f: " ".join(parts) for f, parts in fields.items()} for c, fields in out.items()}
