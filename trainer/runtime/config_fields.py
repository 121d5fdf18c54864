"""The machinery of typed configs: how a key is declared (`choice`, `number`, `path`, `nonempty`, and
`counts` / `fractions`: one quantity as a number of images (or queries) or as a fraction, in two keys), built
from a YAML file and dotted `key=value` overrides (`load`), written back (`dumps`) and listed for --help
(`keys_help`). The declarations themselves live in trainer.runtime.config.

Every error (missing file, unknown key, wrong type, value outside its choices or its range, NaN or
infinity) is a ConfigError whose message is one line naming the key; launch scripts turn it into exit
status 2. Every number declares its range next to its key (`number`, `nonempty`) and is checked at
load time, defaults included, so a stage never starts work with a value it cannot use. Ranges that
depend on the data (e.g. k <= the number of labeled images) are left to the stage.

A key's documentation is the Python comment beside its declaration (trailing, or on the lines just
above), a section's the docstring of its class: `keys_help` reads them from the source, so each is
written once, where the key is declared.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field

import yaml
from data.errors import InputError


class ConfigError(InputError):
    """A config problem, reported as one line naming the key."""


def choice(default, *choices):
    """A str field (or a list of str: each item) restricted to `choices`, or to the names of one collection
    given instead (a trainer.runtime.registry.Registry), read each time a config is validated: a name
    registered since counts."""
    names = choices[0] if len(choices) == 1 and not isinstance(choices[0], str) else choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"choices": names})
    return field(default=default, metadata={"choices": names})


@dataclass(frozen=True)
class Bounds:
    """The range of a number: low..high, each end included or not."""
    text: str                       # as error messages write it: ">= 1", "in [0, 1)"
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, spec: str) -> Bounds:
        """">= a", "> a", or an interval "[a, b]", "[a, b)", "(a, b]", "(a, b)"."""
        if m := re.fullmatch(r"(>=?) *([-+.\de]+)", spec):
            return cls(spec, float(m[2]), low_open=m[1] == ">")
        if m := re.fullmatch(r"([\[(]) *([-+.\de]+) *, *([-+.\de]+) *([\])])", spec):
            return cls(f"in {spec}", float(m[2]), float(m[3]), low_open=m[1] == "(", high_open=m[4] == ")")
        raise InputError(f"bounds {spec!r}: expected '>= a', '> a' or an interval such as '[a, b)'")

    def __contains__(self, x) -> bool:
        return ((self.low < x if self.low_open else self.low <= x)
                and (x < self.high if self.high_open else x <= self.high))


def number(default, bounds: str):
    """An int or float field whose value must lie in `bounds` (see Bounds.parse): ">= 1", "[0, 1)"."""
    return field(default=default, metadata={"bounds": Bounds.parse(bounds)})


def path(help: str, required: bool = True):
    """A file path, `help` saying what it names; a required one has no default (`""`): a stage names its
    inputs in its config, so no run reads another's output by accident."""
    return field(default="", metadata={"path": help} | ({"required": True} if required else {}))


def counts(default, bounds: str, fractions: str, unit: str = "images", of: str = "them"):
    """A whole number of `unit` (images, queries), or a list of them, whose sibling field `fractions` says the
    same as fractions (of `of`: them, the images, for a number of images): one key per unit, so that a 1 is
    one image and never 100%. A config sets one of the two: setting one (in the file, or by an override over
    the file's) unsets the other, to 0 or [], a value held to no bounds unless given; setting both in one
    place is refused, and so is a fraction given here, naming `fractions`."""
    return _paired(default, bounds, {"partner": fractions, "counts": True, "unit": unit, "of": of})


def fractions(default, bounds: str, counts: str):
    """The sibling of a `counts` field named `counts`: the same quantity as fractions of the images (0 or []:
    not set, `counts` gives it)."""
    return _paired(default, bounds, {"partner": counts})


def _paired(default, bounds: str, metadata: dict):
    metadata = {"bounds": Bounds.parse(bounds)} | metadata
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def nonempty(default: list, bounds: str | None = None):
    """A list field that needs at least one item; numeric items must lie in `bounds`."""
    metadata = {"nonempty": True} | ({"bounds": Bounds.parse(bounds)} if bounds else {})
    return field(default_factory=lambda: list(default), metadata=metadata)


# ---- loading ----

def load(cls, path: str | None, overrides: list[str] = ()):
    """Build `cls` from the YAML at `path` (may be None) and `key.sub=value` overrides."""
    tree = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path}: not found")
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    given = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        given.append(_set_dotted(tree, key.split("."), value))
    for section, name in given:   # an override of one of a counts/fractions pair replaces the file's other one
        partner = _field_metadata(cls, section, name).get("partner")
        if partner and (section, partner) not in given:
            _section_node(tree, section).pop(partner, None)
    return _build(cls, tree, prefix="")


def _field_metadata(cls, section: tuple[str, ...], name: str) -> dict:
    """The metadata of field `name` in the section of `cls` at `section` ({} when there is no such field)."""
    for key in section:
        cls = typing.get_type_hints(cls).get(key)
        if not dataclasses.is_dataclass(cls):
            return {}
    found = [f for f in dataclasses.fields(cls) if f.name == name]
    return dict(found[0].metadata) if found else {}


def _section_node(tree: dict, section: tuple[str, ...]) -> dict:
    for key in section:
        tree = tree[key]
    return tree


def _set_dotted(tree: dict, keys: list[str], value) -> tuple[tuple[str, ...], str]:
    """Sets `value` at `keys` in `tree`; returns (the section's keys, the key set)."""
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value
    return tuple(keys[:-1]), keys[-1]


def _build(cls, tree, prefix: str, base=None):
    """`base` (default: cls()) with the values in `tree`; sections keep their own defaults."""
    base = cls() if base is None else base
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section (mapping), got {tree!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - set(fields))
    retired = [key for key in unknown if key in getattr(cls, "RETIRED", {})]
    if retired:   # a key older configs have: say what replaced it
        raise ConfigError(f"{prefix}{retired[0]}: {cls.RETIRED[retired[0]]}")
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():   # every field, not only those given: defaults are checked too
        key, hint, partner = prefix + name, hints[name], f.metadata.get("partner")
        if dataclasses.is_dataclass(hint):
            section = tree.get(name)
            values[name] = _build(hint, section if section is not None else {}, key + ".", getattr(base, name))
            continue
        counted = f.metadata.get("counts")
        if counted and name in tree and partner in tree:
            raise ConfigError(f"{key} and {prefix}{partner}: expected one of the two (a number of "
                              f"{f.metadata['unit']}, or a fraction of {f.metadata['of']}), got both")
        unset = ([] if typing.get_origin(hint) is list else hint(0)) if partner else None   # a pair's "not set"
        if name in tree:
            given = _whole(key, tree[name], prefix + partner, f.metadata["unit"]) if counted else tree[name]
            value = _coerce(key, hint, given)
        elif partner in tree:   # its sibling is set: this one is not
            value = unset
        else:
            value = getattr(base, name)
        allowed = f.metadata.get("choices")
        outside = [v for v in (value if isinstance(value, list) else [value]) if allowed and v not in allowed]
        if outside:   # a list's items each
            raise ConfigError(f"{key}: {outside[0]!r} is not one of {', '.join(map(str, allowed))}")
        if name in tree or not partner or value != unset:   # bounds hold for what is set
            _check_range(key, hint, value, f.metadata)
        if value == "" and "required" in f.metadata:
            raise ConfigError(f"{key}: required: {f.metadata['path']}")
        values[name] = value
    return dataclasses.replace(base, **values)


_KINDS = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers")}


def _whole(key: str, value, fractions_key: str, unit: str):
    """A `counts` field's value (a number or a list) with whole floats as ints (configs written before the
    key took counts only have 200.0); any other number is refused, naming the key that takes fractions."""
    if isinstance(value, list):
        return [_whole(f"{key}[{i}]", v, fractions_key, unit) for i, v in enumerate(value)]
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{key}={value}: expected a whole number of {unit}; fractions moved to {fractions_key}")
        return int(value)
    return value


def _check_range(key: str, hint, value, metadata):
    """Numbers (a list's items too) finite and within the field's bounds; a `nonempty` list not empty."""
    bounds = metadata.get("bounds")
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if metadata.get("nonempty") and not value:
            of = f" of {_KINDS[item][1]} {bounds.text}" if bounds else ""
            raise ConfigError(f"{key}=[]: expected a non-empty list{of}")
        for i, v in enumerate(value):
            _check_number(f"{key}[{i}]", item, v, bounds)
    else:
        _check_number(key, hint, value, bounds)


def _check_number(key: str, hint, value, bounds: Bounds | None):
    if hint not in _KINDS:
        return
    if (hint is float and not math.isfinite(value)) or (bounds and value not in bounds):
        expected = _KINDS[hint][0] + (f" {bounds.text}" if bounds else "")
        raise ConfigError(f"{key}={value}: expected {expected}")


def _coerce(key: str, hint, value):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(t for t in options if t is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]             # `key=5` for a one-item list
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)         # YAML 1.1 reads 1e-4, nan and inf as text
        except ValueError:
            pass                        # not a number: the type error below
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)               # e.g. run.dir=2024 stays a path
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dumps(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---- --help: every key, from the declarations ----

def keys_help(cls) -> str:
    """Every key of `cls`, section by section: its default, its type with its range or choices, and its
    comment; for an argparse epilog (RawDescriptionHelpFormatter keeps the layout)."""
    lines = ["keys (set them in the --config YAML, or as dotted.key=value):"]
    _describe_section(cls(), "", "", lines)
    return "\n".join(lines)


def _describe_section(section, prefix: str, comment: str, lines: list[str]):
    """`section`'s own keys under a heading, then its subsections, each the same way."""
    cls = type(section)
    docstring, comments = _documentation(cls)
    hints = typing.get_type_hints(cls)
    subsections = []
    if prefix:   # what the parent's comment says of this section, then what its class says of itself
        lines += ["", prefix.rstrip("."), *_wrap(comment, "    "), *_wrap(docstring, "    ")]
    for f in dataclasses.fields(cls):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            subsections.append((value, f"{prefix}{f.name}.", comments.get(f.name, "")))
            continue
        lines.append(f"  {prefix}{f.name}{_default_and_kind(hints[f.name], f.metadata, value)}")
        said = [f.metadata.get("path", ""), comments.get(f.name, "")]   # what a path names, then the comment
        lines += _wrap("; ".join(filter(None, said)), "      ")
    for value, key, comment in subsections:
        _describe_section(value, key, comment, lines)


def _default_and_kind(hint, metadata, value) -> str:
    """` = DEFAULT  (TYPE RANGE)`, the default as a command line writes it; `  (required path)`."""
    if "required" in metadata:
        return "  (required path)"
    if "path" in metadata:
        kind = "path"
    elif "choices" in metadata:
        kind = ("list, each " if typing.get_origin(hint) is list else "") + "one of " + ", ".join(
            map(str, metadata["choices"]))
    else:
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else None
        # str(hint): an Optional (which _coerce takes) has no __name__
        kind = f"list of {item.__name__}" if item else (hint.__name__ if isinstance(hint, type) else str(hint))
        kind += f" {metadata['bounds'].text}" if "bounds" in metadata else ""
        kind += ", at least one" if metadata.get("nonempty") else ""
    return f" = {_shown(value)}  ({kind})"


def _shown(value) -> str:
    """`value` as YAML and the command line write it."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_shown, value)) + "]"
    if isinstance(value, str):
        return value or '""'
    return json.dumps(value)   # true, false, 0.07


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, 104, initial_indent=indent, subsequent_indent=indent)


def _documentation(cls) -> tuple[str, dict[str, str]]:
    """`cls`'s docstring and the comment of each field, its base classes' included (a subclass without a
    docstring, or a field declared again without a comment, keeps its base's)."""
    docstring, comments = "", {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docstring = ast.get_docstring(_class_node(klass)) or docstring   # not __doc__: dataclass makes one up
            comments |= _declared_comments(klass)
    return " ".join(docstring.split()), comments


@functools.cache
def _class_node(cls) -> ast.ClassDef:
    return ast.parse(_source(cls)).body[0]


@functools.cache
def _source(cls) -> str:
    return textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))


@functools.cache
def _declared_comments(cls) -> dict[str, str]:
    """The fields declared in `cls`'s own body that have a comment: the comment lines just above the
    declaration and the comments on its own lines, joined."""
    source = _source(cls)
    lines = source.splitlines()
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    found = {}
    for node in _class_node(cls).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            first = node.lineno
            while first - 1 in comments and lines[first - 2].lstrip().startswith("#"):
                first -= 1
            said = [comments[n] for n in range(first, node.end_lineno + 1) if n in comments]
            if said:
                found[node.target.id] = " ".join(said)
    return found
