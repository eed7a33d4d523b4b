"""Tiny helpers for validating frozen config dataclasses (pure Python).

Every error names the field and what is allowed, e.g.
``ValueError: ControllerConfig.gamma_max must be an integer >= 1, got 0``.
"""

from __future__ import annotations

from typing import Any, Iterable


def fail(owner: str, field: str, allowed: str, value: Any) -> None:
    raise ValueError(f"{owner}.{field} must be {allowed}, got {value!r}")


def check_int(owner: str, field: str, value: Any, *, low: int | None = None, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        fail(owner, field, _range("an integer", low, high), value)


def check_float(
    owner: str,
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # NaN fails
    if ok:
        if low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
    if not ok:
        lo = None if low is None else (f"> {low}" if low_open else f">= {low}")
        hi = None if high is None else (f"< {high}" if high_open else f"<= {high}")
        fail(owner, field, "a number " + " and ".join(s for s in (lo, hi) if s) if (lo or hi) else "a number", value)


def check_choice(owner: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(owner, field, "one of " + ", ".join(repr(c) for c in choices), value)


def _range(kind: str, low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"{kind} in [{low}, {high}]"
    if low is not None:
        return f"{kind} >= {low}"
    if high is not None:
        return f"{kind} <= {high}"
    return kind
