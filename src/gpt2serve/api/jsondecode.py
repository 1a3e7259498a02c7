"""JSON request decoding that cannot raise on hostile input: every failure is a 400 `APIError`.

Python's `json.loads` raises more than `JSONDecodeError`: `RecursionError` for a document nested ~1,000
deep, `ValueError` for an integer literal over 4,300 digits, and it accepts `NaN`, `Infinity` and
`1e999` (infinity). It also returns lone UTF-16 surrogates (`"\\ud800"`) inside strings, which cannot be
encoded as UTF-8 and make the tokenizer raise. `loads()` bounds all of these, with a message naming the
limit and what was given:

- nesting depth (objects and arrays) at most `MAX_DEPTH`;
- a number literal at most `MAX_NUMBER_CHARS` characters, and finite (no NaN, Infinity, 1e999);
- strings (keys included) are valid Unicode: no lone surrogates.
"""

from __future__ import annotations

import json
import math
from typing import Any

from gpt2serve.api.errors import APIError

MAX_DEPTH = 64
MAX_NUMBER_CHARS = 100


def loads(text: str, line: int | None = None) -> Any:
    """The decoded JSON value of `text`, or a 400 APIError saying what is wrong and where."""
    where = "" if line is None else f" (line {line})"
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno} column {exc.colno}" if line is None else f"line {line} column {exc.colno}"
        raise APIError(400, f"malformed JSON: {exc.msg} at {at}") from None
    except RecursionError:
        raise APIError(400, f"the JSON body{where} is nested deeper than the limit of {MAX_DEPTH}") from None
    except _NumberError as exc:
        raise APIError(400, f"{exc}{where}") from None
    _check_tree(value, where)
    return value


class _NumberError(ValueError):
    """Raised from the number hooks; turned into a 400 by `loads`."""


def _shown(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-6:]}"


def _check_length(literal: str) -> None:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _NumberError(
            f"a number in the JSON body has {len(literal)} characters ({_shown(literal)}); "
            f"the limit is {MAX_NUMBER_CHARS}"
        )


def _parse_int(literal: str) -> int:
    _check_length(literal)
    return int(literal)


def _parse_float(literal: str) -> float:
    _check_length(literal)
    value = float(literal)
    if not math.isfinite(value):
        message = f"the number {_shown(literal)} in the JSON body is out of range for a 64-bit float"
        raise _NumberError(message)
    return value


def _constant(name: str) -> float:
    raise _NumberError(f"{name} is not valid JSON; numbers must be finite")


def _check_tree(value: Any, where: str) -> None:
    """Depth and surrogate checks, iteratively (no recursion on a hostile document)."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path, where)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_DEPTH:
            raise APIError(400, f"the JSON body{where} is nested deeper than the limit of {MAX_DEPTH}")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, path, where)
                stack.append((child, depth + 1, f"{path}.{key}" if path else key))
        else:
            stack.extend((child, depth + 1, f"{path}[{i}]") for i, child in enumerate(item))


def _check_text(text: str, path: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        path = path if len(path) <= 80 else path[:77] + "..."
        name = f"`{path}`" if path else "the JSON body"
        raise APIError(
            400,
            f"{name}{where} holds a lone UTF-16 surrogate (\\u{code:04x}) at character {exc.start}; "
            "strings must be valid Unicode",
            param=path or None,
        ) from None
