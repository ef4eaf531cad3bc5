"""Argument types shared by the command-line subcommands (argparse `type=` callables and choices)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

import torch

import sampling

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


def sampling_temperature(text: str) -> float | tuple[float, float]:
    """A sampling (token) temperature: 'T' at every step or 'start,end' annealed over the steps; finite and > 0."""
    what = "a sampling temperature is T or 'start,end' (for example 1.3,0.5)"
    values = _finite_numbers(text, what, (1, 2))
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{what}, each > 0, got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def refine_ratio(text: str) -> float | tuple[float, float]:
    """A refinement masking ratio: 'R' at every pass or 'start,end' annealed over the passes; each in (0, 1]."""
    what = "a refinement ratio is R or 'start,end' (for example 0.6,0.2)"
    values = _finite_numbers(text, what, (1, 2))
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"{what}, each in (0, 1], got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_refine_flags(p: argparse.ArgumentParser) -> None:
    """--refine-steps and --refine-ratio (the pipeline's refine_steps / refine_ratio; unset: the model's default)."""
    p.add_argument(
        "--refine-steps",
        type=non_negative_int,
        default=None,
        help="refinement passes after decoding: re-mask some decoded tokens and put back the most likely codes "
        "(default: the model's, else 0)",
    )
    p.add_argument(
        "--refine-ratio",
        type=refine_ratio,
        default=None,
        metavar="R|START,END",
        help="share of the decoded tokens each refinement pass re-masks, in (0, 1]; START,END anneals it over "
        "the passes (default: the model's, else 0.3)",
    )


def guidance_schedule(text: str) -> str:
    """A guidance schedule: constant, linear, cosine, power-cosine or power-cosine:<exponent> (kept as text)."""
    try:
        sampling.GuidanceSchedule.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'power-cosine:<exponent>')") from None
    return text


def step_interval(text: str) -> tuple[int, int]:
    """'START,END': 0-based step indices with 0 <= START <= END (the steps START <= i < END)."""
    what = "a step interval is 'START,END', 0-based step indices with 0 <= START <= END (for example 2,8)"
    try:
        start, end = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
    if not 0 <= start <= end:
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return start, end


def optional_step_interval(text: str) -> tuple[int, int] | None:
    """'none' (every step) or 'START,END' (see `step_interval`)."""
    return None if text.lower() == "none" else step_interval(text)


def check_seed_span(seed: int, count: int, count_flag: str) -> None:
    """Images seed .. seed + count - 1 must all be seeds torch accepts."""
    if seed + count > SEED_LIMIT:
        raise ValueError(f"--seed {seed} with {count_flag} {count} runs past the largest seed 2**63 - 1")


def check_steps(
    num_steps: int | None, guidance_interval: tuple[int, int] | None, sampler: sampling.Sampler | None
) -> None:
    """The guidance interval and the sampler's own step window fit `num_steps` (nothing to check when unknown)."""
    if num_steps is None:
        return
    if guidance_interval is not None:
        sampling.check_interval(guidance_interval, "--guidance-interval", num_steps)
    if sampler is not None:
        sampler.check(num_steps)


# --- samplers: NAME or NAME:key=value,... --------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _parameter_value(text: str, kind, what: str):
    """One sampler parameter's text -> a value of the field's type `kind` (bool, int, float, str, a (start, end)
    pair of steps written START-END, or any of them | None, written 'none')."""
    options = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in options:
        if text.lower() == "none":
            return None
        (kind,) = [k for k in options if k is not type(None)]
    if kind is bool:
        if text.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{what} is true or false, got {text!r}")
        return text.lower() in _TRUE
    if kind is float:
        try:
            return finite_float(text)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{what}: {e}") from None
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{what} is an integer, got {text!r}") from None
    if typing.get_origin(kind) is tuple:
        try:
            start, end = (int(x) for x in text.split("-"))
        except ValueError:
            raise ValueError(f"{what} is START-END (0-based steps START <= i < END) or none, got {text!r}") from None
        return start, end
    return text


def _fields(cls: type) -> dict[str, typing.Any]:
    """A sampler dataclass's parameters: name -> type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_sampler(text: str) -> sampling.Sampler:
    """'NAME' or 'NAME:key=value,...' (for example 'remask:eta=0.2,strategy=cap', 'halton:random_offset=true') ->
    the sampler; a ValueError names an unknown sampler or parameter, or a bad value."""
    name, _, params = text.strip().partition(":")
    if name not in sampling.SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sampling.SAMPLERS)}")
    cls = sampling.SAMPLERS[name]
    fields = _fields(cls)
    values = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"sampler {name}: parameters are key=value, got {item!r}")
        if key not in fields:
            known = f"its parameters are {', '.join(fields)}" if fields else "it takes no parameters"
            raise ValueError(f"sampler {name} has no parameter {key!r}; {known}")
        if key in values:
            raise ValueError(f"sampler {name}: parameter {key!r} given twice")
        values[key] = _parameter_value(value.strip(), fields[key], f"sampler {name} {key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampler {name}: {e}") from None


def sampler(text: str) -> sampling.Sampler:
    """The argparse type of --sampler (see `parse_sampler`)."""
    try:
        return parse_sampler(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parameter_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "-".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def sampler_text(spec: str | sampling.Sampler) -> str:
    """The canonical text of a sampler: its name, then ':' and the parameters that differ from their defaults in the
    order the dataclass declares them ('confidence', 'remask:eta=0.2'). parse_sampler(sampler_text(s)) == s."""
    s = parse_sampler(spec) if isinstance(spec, str) else spec
    changed = [
        f"{f.name}={_parameter_text(getattr(s, f.name))}"
        for f in dataclasses.fields(s)
        if getattr(s, f.name) != f.default
    ]
    return s.name + (":" + ",".join(changed) if changed else "")


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
