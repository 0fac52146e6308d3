"""One definition per option: config dataclasses drive YAML files, CLI flags and `--help`.

Each command declares dataclasses whose fields carry `metadata={"help": ...}` (the convention of
HfArgumentParser and TRL's configs). `parse_command` builds an argparse parser from them, adds
`--config FILE` (YAML with any of the same keys), and lets command-line flags override the file.
The builder is delrec's own, a few dozen lines, so that `delrec data` and `delrec sr` never import
transformers just to read their flags. Unknown keys, wrong types and bad choices are
`DelrecError`s naming the file and the key, so a typo never silently falls back to a default.

Numbers are range-checked where they are read: a field declares the values it accepts as
`metadata={"help": ..., "range": at_least(1)}` (`between`, `above`, or a shared bound such as `SEED`),
and every float option must be finite. A YAML value out of range is an error naming the file and key, a
flag one naming the option and value, before anything is built: a batch size of -1 would otherwise run
zero batches and a seed of -1 fail deep inside numpy. `--help` shows each range beside the default, and
config classes call `check_fields` in `__post_init__` so that configs built in Python are held to the same.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import re
import reprlib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

from delrec.errors import DelrecError, where

T = TypeVar("T")


MAX_SHOWN = 200
"""Characters of a found value an error message echoes: enough to recognise it, never megabytes of it."""
MAX_ALIAS_VALUES = 10_000
"""Values that aliases (`*name`) may add to one YAML document. Reusing a section through an anchor adds
tens; the 300-byte "billion laughs" document adds a billion, and echoing it took GBs."""
MAX_YAML_DEPTH = 100
"""Nesting levels of one YAML document: configs nest a few; deeper input would exhaust Python's stack."""

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_SHOWN
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset, _REPR.maxlong = 3, 8, 8, 8, 8, 40


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric option accepts: `low`..`high` (None: unbounded), each end included unless
    it is open (a learning rate is above 0, a dropout below 1). `text`, when given, says it in the option's
    own words in errors and `--help` ("0 (off) or a positive count")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    text: str | None = None

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.text:
            return self.text
        low = None if self.low is None else f"{'above' if self.low_open else 'at least'} {self.low}"
        high = None if self.high is None else f"{'below' if self.high_open else 'at most'} {self.high}"
        if low and high and not (self.low_open or self.high_open):
            return f"between {self.low} and {self.high}"
        return " and ".join(part for part in (low, high) if part)


def at_least(low: float, text: str | None = None) -> Bounds:
    return Bounds(low, text=text)


def between(low: float, high: float, text: str | None = None) -> Bounds:
    return Bounds(low, high, text=text)


def above(low: float, high: float | None = None, text: str | None = None) -> Bounds:
    """Above `low` (excluded), and at most `high`."""
    return Bounds(low, high, low_open=True, text=text)


SEED = between(0, 2**32 - 1)
"""Every seed: numpy's legacy seeding (which training uses beside torch's) takes exactly these."""
THREADS = between(0, 1024)
"""torch CPU threads, 0 meaning the process's own: more than any machine delrec runs on has cores."""
SOFT_PROMPT_TOKENS = between(1, 100_000)
"""Soft-prompt vectors P: DELRec uses tens to hundreds; 100,000 already exceeds the context of the LLMs
delrec trains (Gemma 3 270M: 32,768 tokens), and each placeholder token is ~10 characters of prompt text."""
WIDTH = between(1, 65_536)
"""A layer's width (hidden size, feed-forward or GRU units, filters): models delrec trains are tens to a few
thousand wide, the largest LLMs 16,384."""
HISTORY_LENGTH = between(1, 100_000)
"""The longest history an SR model reads (max_length): real runs use 50-200, long-sequence studies thousands."""
SHARE = between(0, 1)
"""A probability or fraction."""
DROPOUT = Bounds(0, 1, high_open=True)
"""A dropout rate: 1 would drop everything."""


Device = Literal["auto", "cpu", "cuda"]


def device_option(default: Device = "auto", *, what: str = "Where to run",
                  auto: str = "CUDA if available, else CPU") -> Any:
    """The one declaration of a command's `device` option (annotated `Device`): the choices `delrec.device.resolve_device` takes,
    the default the command needs (serving and merging default to the CPU) and, where it differs, what auto means."""
    return dataclasses.field(default=default, metadata={"help": f"{what}: cpu, cuda, or auto ({auto})."})


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def excerpt(value: Any, limit: int = MAX_SHOWN) -> str:
    """A bounded `repr(value)` for error messages: reprlib stops at a few items and levels, so a huge or
    self-referencing value is never rendered in full."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer too long for Python to write out
        text = f"<{type(value).__name__} too large to show>"
    return shorten(text, limit)


class StrictLoader(yaml.SafeLoader):
    """The YAML loader of every file delrec reads (configs, pipeline configs, template headers,
    domains.yaml): safe, and it refuses what `yaml.safe_load` lets through silently: a duplicate
    key (which would win over the first without a word), aliases expanding to more than
    `MAX_ALIAS_VALUES` values (a few hundred bytes can otherwise stand for billions of values),
    a recursive alias and nesting deeper than `MAX_YAML_DEPTH`."""

    def __init__(self, stream: str, first_line: int = 1):
        super().__init__(stream)
        self.first_line = first_line  # the file line the text starts on, for the lines messages name
        self._values: dict[int, int] = {}  # id(node) -> values under it once every alias is expanded
        self._open: list[str | None] = []  # the anchors of the nodes being composed, outermost first
        self._alias_values = 0

    def compose_document(self):
        self._values, self._open, self._alias_values = {}, [], 0
        return super().compose_document()

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise yaml.composer.ComposerError(None, None, f"alias *{shorten(event.anchor)} refers to the value "
                                                  "that contains it", event.start_mark)
            target = self.anchors.get(event.anchor)
            if target is not None:
                self._alias_values += self._values[id(target)]
                if self._alias_values > MAX_ALIAS_VALUES:
                    raise yaml.composer.ComposerError(
                        None, None, f"aliases (*name) expand to more than {MAX_ALIAS_VALUES:,} values; write the "
                        "values out or reuse fewer of them", event.start_mark)
            return super().compose_node(parent, index)
        if len(self._open) >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                              event.start_mark)
        self._open.append(event.anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open.pop()
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        self._values[id(node)] = 1 + sum(self._values[id(child)] for child in children)
        return node

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:  # e.g. `2001-13-14` read as a date, a 5000-digit integer
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"'{shorten(str(node.value), 40)}' cannot be read as {kind} ({shorten(str(exc), 60)}); "
                "quote it to keep it as text", node.start_mark) from None

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    seen = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the SafeLoader reports it
                    continue
                if seen is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {excerpt(key)} (first at line "
                        f"{self.first_line + seen.start_mark.line}); each key may appear once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str | Path, *, first_line: int = 1, what: str = "YAML") -> Any:
    """`text` read with `StrictLoader`; a problem is a one-line DelrecError `source:line: invalid WHAT (...)`,
    `first_line` being the file line the text starts on."""
    loader = StrictLoader(text, first_line)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context", None)
        problem = getattr(exc, "problem", None) or str(exc)
        if context and getattr(exc, "context_mark", None) is not None:  # e.g. where a duplicate anchor was first
            problem = f"{context} (line {first_line + exc.context_mark.line}): {problem}"
        line = first_line + mark.line if mark is not None else None
        # the parts of `problem` are cut where they are built; this bound keeps their advice whole
        raise DelrecError(f"{where(source, line)}: invalid {what} ({shorten(problem, 600)})") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors say which file and line is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DelrecError(f"{path}: config file not found")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError:
        raise DelrecError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DelrecError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def unknown_key_error(source: str, key: str, valid: Sequence[str]) -> DelrecError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(sorted(valid))}"
    return DelrecError(f"{source}: unknown key '{shorten(key)}'; {hint}")


def dataclass_from_dict(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build a config dataclass from a dict (a YAML file or a saved config.json), strictly."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key_error(source, key, list(fields))
        problem = range_problem(fields[key], value)
        if problem:  # a saved config.json is read without the parser: its numbers are checked here
            raise DelrecError(f"{source}: key '{key}' {problem}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise DelrecError(f"{source}: {shorten(str(exc), 2 * MAX_SHOWN)}") from None


class CommandParser(argparse.ArgumentParser):
    """Argument parser whose errors are one line and exit code 2 (no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _coerce(value: Any, action: argparse.Action, source: str) -> Any:
    """Convert a YAML value the way argparse would convert the same value given as a flag."""
    if value is None:
        return None
    if action.type is key_value:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise DelrecError(f"{source}: key '{action.dest}' expects a mapping of option names to values, got "
                              f"{excerpt(value)}")
        return value
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(item, action, source) for item in items]
    return _coerce_scalar(value, action, source)


def _coerce_scalar(value: Any, action: argparse.Action, source: str) -> Any:
    kind = action.type
    base = getattr(kind, "base", kind)  # int for an optional int
    expected = getattr(kind, "__name__", "value")
    if isinstance(value, (dict, list)):
        raise DelrecError(f"{source}: key '{action.dest}' expects a single {expected}, got {excerpt(value)}")
    if isinstance(value, bool):
        if base in (int, float, str):
            raise DelrecError(f"{source}: key '{action.dest}' expects {expected}, got {excerpt(value)}")
    elif base is int and isinstance(value, float) and not value.is_integer():
        raise DelrecError(f"{source}: key '{action.dest}' expects an integer, got {excerpt(value)}")
    elif kind is not None:
        try:
            value = kind(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise DelrecError(f"{source}: key '{action.dest}' expects {expected}, got {excerpt(value)}") from None
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(str(c) for c in action.choices)
        raise DelrecError(f"{source}: key '{action.dest}' must be one of {allowed}, got {excerpt(value)}")
    problem = _out_of_range(value, getattr(action, "bounds", None))
    if problem:
        raise DelrecError(f"{source}: key '{action.dest}' {problem}")
    return value


class HelpFormatter(argparse.HelpFormatter):
    """Ranges and defaults in `--help`: `(at least 1; default: 64)`; no default for required options,
    options without one, or `--no_X` switches."""

    def _get_help_string(self, action: argparse.Action) -> str:
        bounds = getattr(action, "bounds", None)
        notes = [] if bounds is None else [str(bounds)]
        if not (action.required or action.default is None or action.default is argparse.SUPPRESS
                or action.option_strings[:1] == [f"--no_{action.dest}"]):
            notes.append("default: %(default)s")
        text = action.help or ""
        return f"{text} ({'; '.join(notes)})" if notes else text


def boolean(text: str | bool) -> bool:
    """A flag or YAML value read as a truth value (yes/no, true/false, t/f, y/n, 1/0)."""
    if isinstance(text, bool):
        return text
    lowered = str(text).lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a truth value (true/false, yes/no, 1/0), got '{text}'")


def key_value(text: str) -> tuple[str, Any]:
    """One `NAME=VALUE` of a mapping option on the command line, the value read as YAML (`bias=all`, `use_rslora=true`,
    `adam_beta2=0.95`)."""
    name, sep, value = str(text).partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got '{text}'")
    return name, parse_yaml(value, "a command-line value") if value else None


key_value.__name__ = "NAME=VALUE"


class _MappingAction(argparse.Action):
    """A mapping option's `NAME=VALUE` pairs as one dict (they replace a mapping the config file gave)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, dict(values))


def _choice(choices: tuple) -> Any:
    """Map a flag's text onto the Literal's value of the same spelling (so `--k 5` can pick the int 5)."""
    by_text = {str(choice): choice for choice in choices}

    def choice(text: Any) -> Any:
        return by_text.get(str(text), text)

    return choice


def _or_none(kind: Any) -> Any:
    """`kind`, or None for the text `none` / `null`: how an optional option is turned off on the command line."""

    def parse(text: Any) -> Any:
        if isinstance(text, str) and text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = f"{getattr(kind, '__name__', 'value')} or none"
    parse.base = kind
    return parse


def _out_of_range(value: Any, bounds: Bounds | None) -> str | None:
    """What is wrong with `value` for an option bounded by `bounds` (a float must also be finite); None when
    nothing is, or when `value` is no number (the type checks' business)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    finite = not isinstance(value, float) or math.isfinite(value)
    if finite and (bounds is None or value in bounds):
        return None
    if not finite and (bounds is None or bounds.text is None):
        return f"must be a finite number, got {value}"
    return f"must be {bounds}, got {excerpt(value)}"


def range_problem(field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with a number (or a list's numbers) given for `field`: out of its declared range, or
    NaN/inf; None when nothing is (values of other types are the type checks' business)."""
    for item in value if isinstance(value, list) else [value]:
        problem = _out_of_range(item, field.metadata.get("range"))
        if problem:
            return problem
    return None


def check_fields(config: Any) -> None:
    """Raise ValueError for the first field of the config dataclass `config` out of its declared range:
    `__post_init__` calls it, so a config built in Python is held to the ranges the parser enforces."""
    for field in dataclasses.fields(config):
        problem = range_problem(field, getattr(config, field.name))
        if problem:
            raise ValueError(f"{field.name} {problem}")


def _is_optional(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _without_none(annotation: Any) -> Any:
    """X for `X | None` / `Optional[X]`; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported option type {annotation}: one type (or None) per option")
        return args[0]
    return annotation


def _default(field: dataclasses.Field) -> dict[str, Any]:
    if field.default is not dataclasses.MISSING:
        return {"default": field.default}
    if field.default_factory is not dataclasses.MISSING:
        return {"default": field.default_factory()}
    return {"required": True}


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--name` (and `--na-me`) flag per init field of `cls`: type, choices, default and help from the field.

    Booleans take an optional value (`--x`, `--x false`); a boolean defaulting to true also gets `--no_x`.
    Lists take one or more values. `Literal[...]` becomes choices. An optional (`X | None`) option also
    takes `none`.
    """
    hints = typing.get_type_hints(cls)
    # the command's own options first, then the shared groups it inherits (keyword-only, e.g. PromptsFolder)
    for field in sorted(dataclasses.fields(cls), key=lambda f: f.kw_only is True):
        if not field.init:
            continue
        names = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
        kind = _without_none(hints[field.name])
        text = field.metadata.get("help")  # prose: a "%" is a percent sign, not an argparse format
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%") if text else text, **_default(field)}
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            kwargs.update(choices=choices, type=_choice(choices))
        elif kind is bool:
            kwargs.update(type=boolean, nargs="?", const=True)
            kwargs.setdefault("default", False)
            kwargs.pop("required", None)
        elif typing.get_origin(kind) is list:
            kwargs.update(type=typing.get_args(kind)[0], nargs="+")
        elif typing.get_origin(kind) is dict:  # NAME=VALUE ...; a mapping in YAML
            kwargs.update(type=key_value, nargs="+", metavar="NAME=VALUE", action=_MappingAction)
        else:
            kwargs["type"] = _or_none(kind) if _is_optional(hints[field.name]) else kind
        bounds = field.metadata.get("range")
        if bounds is not None and getattr(kwargs["type"], "base", kwargs["type"]) not in (int, float):
            raise TypeError(f"option '{field.name}': a range needs an int or float option, not {kind}")
        parser.add_argument(*names, **kwargs).bounds = bounds  # read by `_coerce_scalar` and `--help`
        if kind is bool and field.default is True:
            parser.add_argument(f"--no_{field.name}", f"--no-{field.name.replace('_', '-')}", action="store_false",
                                dest=field.name, help=f"Turn --{field.name} off (it is on by default).")


def build_parser(dataclass_types: Sequence[type], prog: str, description: str | None = None) -> CommandParser:
    parser = CommandParser(prog=prog, description=description, formatter_class=HelpFormatter)
    for cls in dataclass_types:
        add_dataclass_arguments(parser, cls)
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML file setting any of the options below by name; flags on the command line override it.",
    )
    return parser


def parse_command(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None,
    prog: str,
    description: str | None = None,
) -> tuple:
    """Parse `argv` (with an optional `--config FILE`) into one instance per dataclass."""
    parser = build_parser(dataclass_types, prog, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        apply_config_file(parser, known.config)
    namespace = parser.parse_args(argv)
    values = vars(namespace)
    outputs = []
    for cls in dataclass_types:
        kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values}
        for field in dataclasses.fields(cls):  # the flags' numbers: the config file's were checked as it was read
            problem = range_problem(field, kwargs.get(field.name))
            if problem:
                raise DelrecError(f"{field.name} {problem}")
        try:
            outputs.append(cls(**kwargs))
        except ValueError as exc:
            raise DelrecError(shorten(str(exc), 2 * MAX_SHOWN)) from None
    return tuple(outputs)


def preparsed_option(argv: Sequence[str], name: str, default: str | None = None) -> str | None:
    """The value of `--NAME` from the flags, else from the `--config` YAML, before the full parse: for
    options that choose which config dataclasses the command parses (`--model`, `--backend`, ...)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(f"--{name}", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv))
    value = getattr(known, name)
    if value is None and known.config:
        value = load_yaml(known.config).get(name)
        if isinstance(value, (dict, list)):
            raise DelrecError(f"{known.config}: key '{name}' expects a single value, got {excerpt(value)}")
    return default if value is None else str(value)


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each option's action by name (the first one: `--no_x` flags share the dest of `--x`)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)
    return actions


def coerce_config(parser: argparse.ArgumentParser, data: dict[str, Any], source: str,
                  hidden: Sequence[str] = ()) -> dict[str, Any]:
    """The mapping's values converted and checked as the parser's flags would be; an unknown key
    is a one-line error listing the valid ones (less `hidden`) and naming `source`."""
    actions = option_actions(parser)
    values = {}
    for key, value in data.items():
        if key not in actions:
            raise unknown_key_error(source, str(key), [k for k in actions if k not in hidden])
        values[key] = _coerce(value, actions[key], source)
    return values


def apply_config_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Make the YAML file's values the parser's defaults, validating every key and value."""
    defaults = coerce_config(parser, load_yaml(path), str(path))
    actions = option_actions(parser)
    for key in defaults:
        actions[key].required = False
    parser.set_defaults(**defaults)


_NO_MEMORY = re.compile(r"can't allocate memory|not enough memory|out of memory", re.IGNORECASE)
_REQUESTED = re.compile(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGTPE]?i?B)", re.IGNORECASE)


@contextlib.contextmanager
def memory_for(what: str, hint: str):
    """Run the block; an allocation the machine refuses (MemoryError, numpy's ArrayMemoryError, torch's
    "DefaultCPUAllocator: not enough memory" or CUDA out of memory) becomes one line: `what` needed more
    memory than is free, how much was requested, and `hint` (which options to lower). Option ranges stop
    absurd sizes; this stops the ones in range that this machine cannot hold."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and not _NO_MEMORY.search(str(exc)):
            raise
        found = _REQUESTED.search(str(exc))
        requested = ("" if found is None else
                     f" ({int(found[1]):,} bytes requested)" if found[1] else f" ({found[2]} requested)")
        raise DelrecError(f"not enough memory for {what}{requested}; {hint}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
