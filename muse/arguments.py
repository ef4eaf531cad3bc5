"""Argument types shared by the command-line subcommands (argparse `type=` callables and choices)."""

from __future__ import annotations

import argparse
import math

import torch

DTYPES = ("float32", "float16", "bfloat16")


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes seeds below this (a signed 64-bit integer)


def finite_float(text: str) -> float:
    """A finite number (NaN and infinities would silently switch guidance or re-masking off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def seed(text: str) -> int:
    """A generator seed: an integer in [0, 2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed is an integer in [0, 2**63), got {text}")
    return value


def _finite_numbers(text: str, what: str, counts: tuple[int, ...]) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{what} of finite numbers, got {text!r}")
    return values


def temperature(text: str) -> float | tuple[float, float]:
    """A re-masking temperature: 'T' (annealed from T) or 'start,end' (for example 2,0), finite."""
    values = _finite_numbers(text, "a temperature is T or 'start,end' (for example 2,0)", (1, 2))
    return values[0] if len(values) == 1 else (values[0], values[1])


def temperature_pair(text: str) -> tuple[float, float]:
    """A re-masking temperature 'start,end' (for example 2,0), finite."""
    start, end = _finite_numbers(text, "a temperature is 'start,end' (for example 2,0)", (2,))
    return start, end


def check_device(spec: str | None) -> None:
    """A `--device`: a device torch knows, and for CUDA one this machine has (checked before any model loads)."""
    if spec is None:
        return
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r} is not a device (for example cpu, cuda or cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
