"""Bounds on output constraints (JSON schemas, GBNF grammars, tools), for both daemons.

A grammar engine does work in proportion to what a request asks for, not to
its size: a 90-byte schema with ``minLength: 10000000`` expands into a grammar
of tens of MiB, and ``maxLength: 200000`` into one nested 200,000 levels deep,
which llama.cpp's recursive grammar parser does not survive. So every number
that expands a grammar is bounded, as are the sizes and nesting of what is
sent and of what is built from it. The coordinator checks a request before it
places it (a clear 400); the node checks again before it converts or parses
anything (defence in depth). Every refusal is INVALID_ARGUMENT with the named
reason the caller passes (BAD_SCHEMA, BAD_GRAMMAR, BAD_TOOLS) and a message
naming the limit. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any

from edgefleet.errors import InvalidArgument, Reason
from edgefleet.v1 import common_pb2

KIB = 1024
MAX_SCHEMA_BYTES = 64 * KIB  # a JSON schema as sent (UTF-8)
MAX_SCHEMA_DEPTH = 32  # nested JSON objects and arrays in a schema
# minLength, maxLength, minItems, maxItems, ... and {m,n} in a pattern or a
# grammar: each is copied that many times (or nested that deep) in the grammar.
MAX_REPEAT = 1000
MAX_SCHEMA_NUMBER = 10**18  # |minimum|, |maximum|, ... (digits expand some converters)
MAX_PATTERN_CHARS = 4 * KIB  # a schema's "pattern" regex
MAX_PATTERN_EXPANSION = 10_000  # elements a pattern expands to, repetitions multiplied out
MAX_GRAMMAR_BYTES = 256 * KIB  # GBNF, sent or built from a schema
MAX_GRAMMAR_NESTING = 1024  # parentheses inside parentheses in GBNF
MAX_GRAMMAR_EXPANSION = 256 * KIB  # grammar elements once llama.cpp expands {m,n}
MAX_TOOLS = 128
MAX_TOOL_NAME = 64  # characters
MAX_TOOLS_BYTES = 256 * KIB  # all tool definitions together, as JSON

COUNT_KEYWORDS = frozenset(
    {
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "minContains",
        "maxContains",
    }
)
NUMBER_KEYWORDS = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
)
# Keywords whose value is one subschema, a map of names to subschemas, or a list of them.
SUBSCHEMA = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "contains",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
    }
)
SUBSCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})


def _refuse(reason: Reason, message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason)


def _size(limit: int) -> str:
    return f"{limit // KIB} KiB" if limit % KIB == 0 else f"{limit} bytes"


# --- JSON schemas -------------------------------------------------------------------------
def check_json_schema(text: str, *, what: str, reason: Reason = Reason.BAD_SCHEMA) -> Any:
    """The schema ``text`` parsed, once it is within every bound (else InvalidArgument)."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SCHEMA_BYTES:
        raise _refuse(reason, f"{what} is {size} bytes; the limit is {_size(MAX_SCHEMA_BYTES)}")
    try:
        schema = json.loads(text)
    except RecursionError:
        raise _refuse(reason, f"{what} nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, and integers over Python's digit limit
        raise _refuse(reason, f"{what} is not valid JSON: {exc}") from None
    check_schema(schema, what=what, reason=reason)
    return schema


def check_schema(schema: Any, *, what: str, reason: Reason = Reason.BAD_SCHEMA) -> None:
    """Check a parsed JSON schema: size, nesting, and every keyword that expands a grammar."""
    _check_depth(schema, what=what, reason=reason)
    size = len(json.dumps(schema).encode("utf-8", "surrogatepass"))
    if size > MAX_SCHEMA_BYTES:
        raise _refuse(
            reason, f"{what} is {size} bytes as JSON; the limit is {_size(MAX_SCHEMA_BYTES)}"
        )
    pending = [(schema, what)]
    while pending:
        node, where = pending.pop()
        if not isinstance(node, dict):
            continue  # true/false, or something the converter will refuse itself
        for key, value in node.items():
            path = f"{where}.{key}"
            if key in COUNT_KEYWORDS:
                _check_count(value, path, reason)
            elif key in NUMBER_KEYWORDS:
                _check_number(value, path, reason)
            elif key == "pattern" and isinstance(value, str):
                check_pattern(value, what=path, reason=reason)
            if key in SUBSCHEMA and isinstance(value, dict):
                pending.append((value, path))
            if key in SUBSCHEMA_MAPS and isinstance(value, dict):
                pending.extend((sub, f"{path}.{name}") for name, sub in value.items())
            if key in SUBSCHEMA_LISTS and isinstance(value, list):
                pending.extend((sub, f"{path}[{i}]") for i, sub in enumerate(value))


def _check_depth(value: Any, *, what: str, reason: Reason) -> None:
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise _refuse(reason, f"{what} nests deeper than {MAX_SCHEMA_DEPTH} levels")
        pending.extend((child, depth + 1) for child in children)


def _check_count(value: Any, path: str, reason: Reason) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT:
        raise _refuse(
            reason, f"{path} must be an integer from 0 to {MAX_REPEAT}, got {_short(value)}"
        )


def _check_number(value: Any, path: str, reason: Reason) -> None:
    if isinstance(value, bool):
        return  # draft-4 exclusiveMinimum/exclusiveMaximum
    if isinstance(value, int):
        ok = abs(value) <= MAX_SCHEMA_NUMBER
    elif isinstance(value, float):
        ok = math.isfinite(value) and abs(value) <= MAX_SCHEMA_NUMBER
    else:
        ok = False
    if not ok:
        raise _refuse(reason, f"{path} must be a finite number within ±10^18, got {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 40 else text[:37] + "..."


# --- regular expressions and grammars: how far their repetitions expand ---------------------
def _quantifier(text: str, i: int, what: str, reason: Reason) -> tuple[int, int]:
    """The ``{m}``, ``{m,}``, ``{,n}`` or ``{m,n}`` at ``text[i]``: (how many times it
    repeats what precedes it, at most; its length in characters)."""
    end = text.find("}", i, i + 64)
    parts = [part.strip() for part in text[i + 1 : end].split(",")] if end > 0 else []
    if (
        not 1 <= len(parts) <= 2
        or not all(part.isascii() and (part.isdigit() or not part) for part in parts)
        or not any(parts)
    ):
        raise _refuse(reason, f"{what}: a malformed repetition at character {i}")
    for part in parts:
        if part and (len(part) > 6 or int(part) > MAX_REPEAT):
            raise _refuse(
                reason, f"{what}: a repetition of {part[:12]} is over the limit of {MAX_REPEAT}"
            )
    low = int(parts[0]) if parts[0] else 0
    if len(parts) == 1:
        times = low
    else:
        times = int(parts[1]) if parts[1] else low + 1
    return max(1, times), end + 1 - i


class _Expansion:
    """Counts elements with every repetition written out; refuses past ``limit``."""

    def __init__(self, limit: int, what: str, reason: Reason) -> None:
        self._limit = limit
        self._what = what
        self._reason = reason
        self._groups: list[int] = [0]  # elements so far in each open group
        self._last = 0  # elements of the last atom or group: what a repetition copies
        self._total = 0

    def atom(self) -> None:
        self._groups[-1] += 1
        self._last = 1
        self._add(1)

    def open(self) -> None:
        self._groups.append(0)
        self._last = 0

    def close(self) -> None:
        if len(self._groups) > 1:
            inner = self._groups.pop()
            self._groups[-1] += inner
            self._last = inner

    def repeat(self, times: int) -> None:
        extra = self._last * (times - 1)
        self._groups[-1] += extra
        self._last *= times
        self._add(extra)

    def boundary(self) -> None:
        """A new rule or alternative: nothing before it can be repeated."""
        self._last = 0

    def _add(self, count: int) -> None:
        self._total += count
        if self._total > self._limit:
            raise _refuse(
                self._reason,
                f"{self._what} expands to more than {self._limit} elements once its "
                "repetitions are written out",
            )


def check_pattern(pattern: str, *, what: str, reason: Reason = Reason.BAD_SCHEMA) -> None:
    """A schema's ``pattern``: its length, each repetition, and how far they multiply."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise _refuse(
            reason, f"{what} is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}"
        )
    expansion = _Expansion(MAX_PATTERN_EXPANSION, what, reason)
    depth = 0
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            expansion.atom()
            i += 2
        elif char == "[":
            i = _skip_class(pattern, i)
            expansion.atom()
        elif char == "(":
            depth += 1
            if depth > MAX_SCHEMA_DEPTH:
                raise _refuse(reason, f"{what} nests groups deeper than {MAX_SCHEMA_DEPTH} levels")
            expansion.open()
            i += 1
        elif char == ")":
            depth = max(0, depth - 1)
            expansion.close()
            i += 1
        elif char == "|":
            expansion.boundary()
            i += 1
        elif char in "*+?":
            i += 1
        elif char == "{":
            times, length = _quantifier(pattern, i, what, reason)
            expansion.repeat(times)
            i += length
        else:
            expansion.atom()
            i += 1


def _skip_class(text: str, i: int) -> int:
    """The index after the character class that starts at ``text[i] == '['``."""
    i += 1
    if i < len(text) and text[i] == "^":
        i += 1
    if i < len(text) and text[i] == "]":
        i += 1  # a leading ']' is a literal
    while i < len(text) and text[i] != "]":
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _skip_string(text: str, i: int) -> int:
    """The index after the string literal that starts at ``text[i] == '"'``."""
    i += 1
    while i < len(text) and text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    return i + 1


def check_grammar(gbnf: str, *, what: str, reason: Reason = Reason.BAD_GRAMMAR) -> None:
    """A GBNF grammar: its size, its nesting, and its repetitions written out."""
    size = len(gbnf.encode("utf-8", "surrogatepass"))
    if size > MAX_GRAMMAR_BYTES:
        raise _refuse(reason, f"{what} is {size} bytes; the limit is {_size(MAX_GRAMMAR_BYTES)}")
    expansion = _Expansion(MAX_GRAMMAR_EXPANSION, what, reason)
    depth = 0
    i, n = 0, len(gbnf)
    while i < n:
        char = gbnf[i]
        if char == "#":
            end = gbnf.find("\n", i)
            i = n if end < 0 else end
        elif char == '"':
            i = _skip_string(gbnf, i)
            expansion.atom()
        elif char == "[":
            i = _skip_class(gbnf, i)
            expansion.atom()
        elif char == "(":
            depth += 1
            if depth > MAX_GRAMMAR_NESTING:
                raise _refuse(
                    reason,
                    f"{what} nests parentheses deeper than {MAX_GRAMMAR_NESTING} levels",
                )
            expansion.open()
            i += 1
        elif char == ")":
            depth = max(0, depth - 1)
            expansion.close()
            i += 1
        elif char == "{":
            times, length = _quantifier(gbnf, i, what, reason)
            expansion.repeat(times)
            i += length
        elif char.isalnum() or char in "-_":
            j = i + 1
            while j < n and (gbnf[j].isalnum() or gbnf[j] in "-_"):
                j += 1
            expansion.atom()
            i = j
        elif char in "|\n" or gbnf.startswith("::=", i):
            expansion.boundary()
            i += 3 if char == ":" else 1
        elif char in " \t\r*+?":
            i += 1
        else:
            expansion.atom()
            i += 1


def check_constraint(
    constraint: common_pb2.OutputConstraint, *, schema_field: str, grammar_field: str
) -> None:
    """An output constraint as sent: the bounds on its schema or grammar (no conversion)."""
    kind = constraint.WhichOneof("kind")
    if kind == "json_schema":
        check_json_schema(constraint.json_schema, what=schema_field)
    elif kind == "gbnf":
        check_grammar(constraint.gbnf, what=grammar_field)
