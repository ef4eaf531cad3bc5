"""Argument types shared by the command-line subcommands (argparse `type=` callables and choices)."""

from __future__ import annotations

import argparse

DTYPES = ("float32", "float16", "bfloat16")


def temperature(text: str) -> float | tuple[float, float]:
    """A re-masking temperature: 'T' (annealed from T) or 'start,end' (for example 2,0)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"a temperature is T or 'start,end' (for example 2,0), got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def temperature_pair(text: str) -> tuple[float, float]:
    """A re-masking temperature 'start,end' (for example 2,0)."""
    try:
        start, end = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a temperature is 'start,end' (for example 2,0), got {text!r}") from None
    return start, end
