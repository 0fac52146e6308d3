"""The Jinja sandbox templates render in: bounded work, and nothing but text and numbers in a prompt.

Prompt engineers write the templates and every training and serving run reads them, so a slip in
one must stop with a message naming the file and line: never hang, fill the memory or put a Python
repr into training data. On top of Jinja's immutable sandbox and strict undefined:

- Work. Rendering one block may take at most `MAX_STEPS` steps (loop iterations, calls, filters,
  operators; a macro call counts as `MACRO_STEPS`, as it takes as long) and pass at most
  `MAX_HANDLED` characters or items through them, and no value it builds, its text included, may
  hold more than `MAX_SIZE`. What would obviously overshoot (repeating a text 10**9 times, a width
  of 10**9, `**`, a `replace` or `join` whose result is too long) is refused before it runs. A real
  prompt is a few thousand tokens (tens of thousands of characters) built in a few hundred steps:
  the limits are far beyond any prompt and still stop a runaway one within about a second.
- Numbers. No number a template writes, computes or prints may have more than `MAX_DIGITS` digits: a
  prompt's numbers are ids, counts and years, and Python refuses to write an integer of more than
  4,300 digits with advice (`sys.set_int_max_str_digits`) that a template author cannot follow. `**`
  and `*` that would overshoot are refused before they compute; a float overflow is an error too.
- Text. A value that becomes text (`{{ }}`, `~`, `%`, a text filter, `join`, `numbered`) must be text
  or a number. A list, None, True/False, a generator or an undefined value is an error: Jinja would
  print it the way Python writes it (`['A', 'B']`, `None`, `<generator object ...>`).
- Surface. No `pprint` or `xmlattr` filter (a repr and HTML) and no `lipsum`; strings offer only the
  methods that cannot grow them (not `ljust`, `center`, `expandtabs`, `format`, ...): the filters
  (`| center`, `| format`, `| replace`, `| join`) do that work within the limits.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from jinja2 import StrictUndefined, Template, Undefined, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateRuntimeError, TemplateSyntaxError
from jinja2.filters import make_attrgetter
from jinja2.lexer import TOKEN_INTEGER, Lexer
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from delrec.config import excerpt

MAX_STEPS = 1_000_000
MAX_HANDLED = 100_000_000
MAX_SIZE = 1_000_000
MACRO_STEPS = 10  # a macro call takes about as long as ten loop iterations
MAX_DIGITS = 1_000

_TOO_MANY_DIGITS = 10**MAX_DIGITS  # the smallest number with more than MAX_DIGITS digits
_MAX_BITS = _TOO_MANY_DIGITS.bit_length()  # a number of more bits has more than MAX_DIGITS digits

_SIZED = (str, bytes, list, tuple, dict, set, frozenset, range)
# filters that take a list (or any value) as input; every other filter works on text or a number
_ANY_INPUT = frozenset({
    "attr", "batch", "count", "d", "default", "dictsort", "first", "groupby", "items", "join", "last", "length",
    "list", "map", "max", "min", "numbered", "random", "reject", "rejectattr", "reverse", "select", "selectattr",
    "slice", "sort", "sum", "tojson", "unique",
})
_PRINTS_ITEMS = frozenset({"join", "numbered"})
_TEXT_METHODS = frozenset({
    "capitalize", "casefold", "count", "endswith", "find", "index", "isalnum", "isalpha", "isascii", "isdecimal",
    "isdigit", "isidentifier", "islower", "isnumeric", "isprintable", "isspace", "istitle", "isupper", "lower",
    "lstrip", "partition", "removeprefix", "removesuffix", "rfind", "rindex", "rpartition", "rsplit", "rstrip",
    "split", "splitlines", "startswith", "strip", "swapcase", "title", "upper",
})
_LARGE_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(?:\d{7,}|\d*\.\d{7,})|\{[^{}]*:[^{}]*\d{7,}")


@dataclass
class _Work:
    steps: int = 0
    handled: int = 0


_WORK: ContextVar[_Work | None] = ContextVar("delrec_template_work", default=None)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, _SIZED) else 1


def _charge(handled: int = 0, steps: int = 1) -> None:
    """`steps` steps passing `handled` characters or items; past a limit the render stops."""
    work = _WORK.get()
    if work is None:  # compile-time constant folding: only the size checks apply
        return
    work.steps += steps
    work.handled += handled
    if work.steps > MAX_STEPS:
        raise SecurityError(f"rendering took more than {MAX_STEPS:,} steps (loop iterations, calls, filters); a "
                            "prompt needs a few hundred: is a loop nested in another, or over a long range()?")
    if work.handled > MAX_HANDLED:
        raise SecurityError(f"rendering passed more than {MAX_HANDLED:,} characters or items through filters, "
                            "calls and operators; a prompt needs far fewer: is a long value processed in a loop?")


def _oversize(size: int, what: str, unit: str = "characters or items") -> SecurityError:
    return SecurityError(f"{what} {size:,} {unit}, above the limit of {MAX_SIZE:,} "
                         "(a whole prompt is tens of thousands of characters)")


def _limit(size: int, what: str, unit: str = "characters or items") -> None:
    if size > MAX_SIZE:
        raise _oversize(size, what, unit)


def _long_number(what: str) -> SecurityError:
    return SecurityError(f"{what} a number of more than {MAX_DIGITS:,} digits; a prompt's numbers are ids, counts "
                         "and years")


def _limit_bits(least_bits: int, what: str) -> None:
    """Refuse, before it is computed, a number that will have at least `least_bits` bits."""
    if least_bits > _MAX_BITS:
        raise _long_number(what)


def _bounded(value: Any, what: str) -> Any:
    if type(value) is int and not -_TOO_MANY_DIGITS < value < _TOO_MANY_DIGITS:
        raise _long_number(what)
    _limit(_size(value), what)
    return value


def describe(value: Any) -> str:
    """A value's type and a short repr, for error messages."""
    return f"{type(value).__name__} {excerpt(value, 60)}"


def printable(value: Any, what: str) -> Any:
    """`value` if it is text or a number; else an error saying what (`what`) got it."""
    if type(value) is str:  # nearly always: titles and wording
        return value
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TemplateRuntimeError(
            f"{what} {describe(value)}, not text or a number; print a list's items with `| numbered` or "
            "`| join(', ')`, and test None or true/false with {% if %}")
    return _bounded(value, what) if isinstance(value, int) else value


def _finalize(value: Any) -> Any:
    return printable(value, "prints")


def _option(value: Any, what: str) -> Any:
    """An argument of a text filter: text, a number, true/false or none (a flag or a default)."""
    return value if value is None or isinstance(value, bool) else printable(value, what)


def _check_numbers(values: Iterable[Any], what: str) -> None:
    for value in values:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_SIZE:
            raise SecurityError(f"{what} got the number {excerpt(value, 40)}, above the size limit of "
                                f"{MAX_SIZE:,}: no width, count or repetition in a prompt is that large")


def _check_format(template: str, values: Iterable[Any], what: str) -> None:
    """Formatting prints its values and pads to the widths in its text: both must be within reason."""
    if _LARGE_FORMAT_WIDTH.search(template):
        raise SecurityError(f"{what} has a width of a million or more in {excerpt(template, 60)}")
    for value in values:
        printable(value, f"{what} got")


def _replaced_size(arguments: dict) -> int:
    text, old, new = str(arguments["s"]), str(arguments["old"]), str(arguments["new"])
    count = text.count(old) if old else len(text) + 1
    if arguments.get("count") is not None and arguments["count"] >= 0:
        count = min(count, arguments["count"])
    return len(text) + count * max(0, len(new) - len(old))


def _indented_size(arguments: dict) -> int:
    text, width = str(arguments["s"]), arguments.get("width", 4)
    pad = len(width) if isinstance(width, str) else max(int(width), 0)
    return len(text) + (text.count("\n") + 1) * pad


def _wrapped_size(arguments: dict) -> int:
    text = str(arguments["s"])
    return len(text) + (len(text) + 1) * len(str(arguments.get("wrapstring") or "\n"))


def _joined_size(arguments: dict) -> int:
    items = arguments["value"]
    return sum(len(str(item)) for item in items) + max(0, len(items) - 1) * len(str(arguments.get("d", "")))


def _json_size(arguments: dict) -> int:
    indent = arguments.get("indent") or 0
    return (_size(arguments["value"]) + 1) * (1 + (len(indent) if isinstance(indent, str) else int(indent)))


# filters whose result can be much longer than their input: its size is estimated before they run
_ESTIMATES: dict[str, Callable[[dict], int]] = {
    "replace": _replaced_size, "indent": _indented_size, "wordwrap": _wrapped_size, "join": _joined_size,
    "tojson": _json_size,
}


def _argument_values(arguments: dict, parameters: list[inspect.Parameter]) -> list[Any]:
    """The values given to `parameters`, `*args` and `**kwargs` spread out."""
    values: list[Any] = []
    for parameter in parameters:
        if parameter.name in arguments:
            value = arguments[parameter.name]
            if parameter.kind is parameter.VAR_POSITIONAL:
                values.extend(value)
            elif parameter.kind is parameter.VAR_KEYWORD:
                values.extend(value.values())
            else:
                values.append(value)
    return values


def _guarded_filter(environment: PromptSandbox, name: str, func: Callable) -> Callable:
    """`func` charged to the work budget, its input and arguments checked by the rules above."""
    if getattr(func, "jinja_async_variant", False):  # the environment is not async: call the plain function
        func = func.__wrapped__
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())
    input_index = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    input_name, options = parameters[input_index].name, parameters[input_index + 1:]
    what = f"filter '{name}'"

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) > input_index + 1:
            bound = signature.bind(*args, **kwargs)
        else:  # the common `value | filter`: no binding to do
            bound = inspect.BoundArguments(signature, dict(zip((p.name for p in parameters), args)))
        arguments = bound.arguments
        value, rest = arguments[input_name], _argument_values(arguments, options)
        _charge(_size(value) + sum(map(_size, rest)))
        _check_numbers(rest, what)
        if name not in _ANY_INPUT:
            printable(value, f"{what} got")
            for option in rest:
                _option(option, f"{what} got the argument")
        if name in _PRINTS_ITEMS and not isinstance(value, str):
            items = list(value)
            if arguments.get("attribute") is not None:
                items = list(map(make_attrgetter(environment, arguments.pop("attribute")), items))
            arguments[input_name] = [printable(item, f"{what} got the item") for item in items]
            printable(arguments.get("d", ""), f"{what} got the separator")
        if name == "format":
            _check_format(str(value), rest, what)
        if name == "int" and isinstance(value, str) and len(value.strip()) > MAX_DIGITS:  # Jinja would give 0
            raise _long_number(f"{what} got")
        if name == "sum" and not isinstance(arguments.get("start", 0), (int, float)):
            raise TemplateRuntimeError(f"{what} adds numbers; its start must be a number, got "
                                       f"{describe(arguments['start'])}")
        if name in _ESTIMATES:
            _limit(_ESTIMATES[name](arguments), f"{what} would build")
        return _bounded(func(*bound.args, **bound.kwargs), f"{what} built")

    return guarded


def _charged_test(func: Callable) -> Callable:
    @functools.wraps(func)
    def charged(*args: Any, **kwargs: Any) -> Any:
        _charge(sum(map(_size, args)))
        return func(*args, **kwargs)

    return charged


def counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """A loop's items, one step each."""
    for item in iterable:
        _charge()
        yield item


def measured(value: Any) -> Any:
    """`value`, once the call to this function has charged its size (what `in`, `==` and slices scan)."""
    return value


def text_part(value: Any) -> Any:
    """An operand of `~`, which Jinja would otherwise write out as Python does."""
    return _bounded(printable(value, "'~' joins"), "'~' joins a value of")


def _wrapped(function: Callable, node: nodes.Expr) -> nodes.Call:
    """`function(node)` as a call in the template, so the sandbox's `call` charges and checks it."""
    name = nodes.ImportedName(f"{__name__}.{function.__name__}", lineno=node.lineno)
    return nodes.Call(name, [node], [], None, None, lineno=node.lineno)


class _MeasuringCodeGenerator(CodeGenerator):
    """Wraps what Jinja does without asking the environment (loops, comparisons, slices, `~`) in calls
    that do; a wrapped `~` operand also keeps `"a" ~ none` from being folded to text at compile time."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in list(node.find_all(nodes.For)):
            loop.iter = _wrapped(counted, loop.iter)
        for operand in list(node.find_all(nodes.Operand)):
            operand.expr = _wrapped(measured, operand.expr)
        for item in list(node.find_all(nodes.Getitem)):
            if isinstance(item.arg, nodes.Slice):
                item.node = _wrapped(measured, item.node)
        for concat in list(node.find_all(nodes.Concat)):
            concat.nodes = [_wrapped(text_part, part) for part in concat.nodes]
        super().visit_Template(node, frame)


class _NumberLexer(Lexer):
    """Jinja's lexer, refusing an integer literal too long to be a prompt's number (Python would not read one of
    more than 4,300 digits: a traceback where a template line should be named)."""

    def wrap(self, stream, name=None, filename=None):
        return super().wrap(_bounded_literals(stream, name, filename), name, filename)


def _bounded_literals(stream, name, filename):
    for lineno, token, value in stream:
        if token == TOKEN_INTEGER and len(value.replace("_", "")) > MAX_DIGITS:
            raise TemplateSyntaxError(f"a number of more than {MAX_DIGITS:,} digits; a prompt's numbers are ids, "
                                      "counts and years", lineno, name, filename)
        yield lineno, token, value


class PromptSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with strict undefined, bounded work and text-only output (see the module)."""

    code_generator_class = _MeasuringCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, filters: Mapping[str, Callable] = ()):
        super().__init__(undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False,
                         finalize=_finalize)
        del self.filters["pprint"], self.filters["xmlattr"], self.globals["lipsum"]
        self.filters = {name: _guarded_filter(self, name, func) for name, func in {**self.filters, **filters}.items()}
        self.tests = {name: _charged_test(func) for name, func in self.tests.items()}

    @functools.cached_property
    def lexer(self) -> Lexer:
        return _NumberLexer(self)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr not in _TEXT_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        if isinstance(obj, str):
            return self.undefined(f"the text method '{attribute}' is not available in prompt templates (it can grow "
                                  "text without bound or print Python reprs); use a filter such as `| format`, "
                                  "`| replace` or `| center`", name=attribute, obj=obj, exc=SecurityError)
        return super().unsafe_undefined(obj, attribute)

    def wrap_str_format(self, value: Any) -> None:
        """No `str.format`: it prints any value as Python writes it; the `format` filter checks its values."""
        return None

    def call(self, context, obj, /, *args: Any, **kwargs: Any) -> Any:
        _charge(sum(map(_size, args)) + sum(map(_size, kwargs.values())), MACRO_STEPS if isinstance(obj, Macro) else 1)
        _check_numbers([*args, *kwargs.values()], "a call")
        if isinstance(obj, LoopContext) and args:  # a recursive loop's next level
            args = (counted(args[0]), *args[1:])
        return _bounded(super().call(context, obj, *args, **kwargs), "a call built")

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        _charge(_size(left) + _size(right))
        if operator == "*":
            count, other = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(count, int) and isinstance(other, _SIZED):
                _limit(len(other) * count, "'*' would build")
            elif isinstance(count, int) and isinstance(other, int) and count and other:
                _limit_bits(count.bit_length() + other.bit_length() - 1, "'*' would build")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            _limit_bits((left.bit_length() - 1) * right + 1, "'**' would build")
        elif operator == "%" and isinstance(left, str):
            values = right.values() if isinstance(right, dict) else right if isinstance(right, tuple) else (right,)
            _check_format(left, values, "'%' formatting")
        try:
            result = super().call_binop(context, operator, left, right)
        except OverflowError:  # float arithmetic, or an integer too large to become a float
            raise SecurityError(f"'{operator}' overflows: its result is beyond the largest float "
                                f"({sys.float_info.max:.3g})") from None
        return _bounded(result, f"'{operator}' built")


def render_block(template: Template, block: str, values: Mapping[str, Any]) -> str:
    """The text of `block` of the compiled `template`, rendered within the limits of the module."""
    token = _WORK.set(_Work())
    try:
        parts, length = [], 0
        text = template.blocks[block](template.new_context(dict(values)))
        for part in text:
            length += len(part)
            if length > MAX_SIZE:  # raised inside the block, so that the error names the template line
                text.throw(_oversize(length, "its text reaches", "characters"))
            parts.append(part)
        return "".join(parts)
    finally:
        _WORK.reset(token)


def template_line(exc: BaseException) -> int | None:
    """The template line that was rendering when `exc` was raised (the innermost template frame)."""
    line, trace = None, exc.__traceback__
    while trace is not None:
        template = trace.tb_frame.f_globals.get("__jinja_template__")
        if template is not None:
            line = template.get_corresponding_lineno(trace.tb_lineno)
        trace = trace.tb_next
    return line
