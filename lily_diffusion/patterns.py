"""Regular expressions that may come from an untrusted file: checked before use, matched under a time budget.

Patterns have Python `re` syntax and meaning (as in peft's configs) but are matched with the `regex` package,
whose `timeout` stops catastrophic backtracking. `regex` expands counted repeats when it compiles (`a{4294967294}`
would exhaust memory) and reads `{e<=1}` as fuzzy matching, so `check_pattern` refuses both before any compile
by `regex`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

import regex

try:  # the parser behind re.compile; public as sre_parse before Python 3.11
    from re import _parser as re_parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as re_parser  # type: ignore[no-redef]

MAX_PATTERN_LENGTH = 2000  # characters; real target regexes are well under 200
MAX_PATTERN_UNITS = 20_000  # parsed items once counted repeats are expanded (~6 MB and a few ms to compile)
MATCH_BUDGET_S = 2.0  # seconds for all the matching of one layout build (normal patterns need milliseconds)

_REPEATS = {re_parser.MAX_REPEAT, re_parser.MIN_REPEAT, getattr(re_parser, "POSSESSIVE_REPEAT", None)} - {None}
_OPEN_BRACE = ord("{")


def check_pattern(field: str, pattern: str) -> None:
    """Raise a one-line `ValueError` unless `pattern` is a valid `re` pattern that is safe to compile."""
    shown = shorten(pattern)
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"{field} regex is {len(pattern)} characters long; at most {MAX_PATTERN_LENGTH} are allowed.")
    try:
        re.compile(pattern)
        parsed = re_parser.parse(pattern)
        has_brace, units = _has_literal_brace(parsed), _units(parsed)
    except re.error as error:
        raise ValueError(f"{field} is not a valid regular expression ({error}): {shown}.") from None
    except RecursionError:
        raise ValueError(f"{field} regex nests groups too deeply: {shown}.") from None
    if has_brace:
        raise ValueError(
            f"{field} regex {shown} has a '{{' that is not part of a {{m,n}} repeat; module names have none, "
            "and the matcher would read it as a fuzzy-match constraint."
        )
    if units > MAX_PATTERN_UNITS:
        raise ValueError(
            f"{field} regex {shown} expands to {units:,} items through its counted repeats "
            f"(at most {MAX_PATTERN_UNITS:,}); use * or + instead of large {{m,n}} counts."
        )


class PatternMatcher:
    """Full-matches checked patterns against module names; all calls together get `budget_s` seconds."""

    def __init__(self, budget_s: float = MATCH_BUDGET_S) -> None:
        self.budget_s = budget_s
        self.deadline = time.monotonic() + budget_s
        self.checked: set[str] = set()

    def fullmatch(self, field: str, pattern: str, name: str) -> bool:
        """Whether `pattern` matches all of `name`; `ValueError` naming the pattern when time runs out."""
        if pattern not in self.checked:
            check_pattern(field, pattern)
            self.checked.add(pattern)
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            return regex.fullmatch(pattern, name, timeout=remaining) is not None
        except TimeoutError:
            raise ValueError(
                f"{field} regex {shorten(pattern)} took over {self.budget_s:g} s to match the model's module names "
                "(catastrophic backtracking); simplify it or give a list of module-name suffixes."
            ) from None
        except regex.error as error:
            raise ValueError(f"{field} regex {shorten(pattern)} cannot be compiled ({error}).") from None


def shorten(value: object, limit: int = 200) -> str:
    """`repr(value)`, cut to `limit` characters."""
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[: limit - 3]}..."


def _subpatterns(value: object) -> Iterable[re_parser.SubPattern]:
    """The sub-patterns nested anywhere in one parsed item's argument."""
    if isinstance(value, re_parser.SubPattern):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subpatterns(item)


def _units(parsed: re_parser.SubPattern) -> int:
    """Parsed items counted as `regex` compiles them: a counted repeat copies its body that many times."""
    total = 0
    for op, value in parsed:
        if op in _REPEATS:
            low, high, body = value
            copies = low if high == re_parser.MAXREPEAT else high
            total += max(1, copies) * _units(body)
        else:
            total += 1 + sum(_units(sub) for sub in _subpatterns(value))
    return total


def _has_literal_brace(parsed: re_parser.SubPattern) -> bool:
    for op, value in parsed:
        if op == re_parser.LITERAL and value == _OPEN_BRACE:
            return True
        if any(_has_literal_brace(sub) for sub in _subpatterns(value)):
            return True
    return False
