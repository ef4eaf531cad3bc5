"""`muse shapes-eval`: prompt adherence of a shapes-domain model, for one setting or as a sampler sweep.

    muse shapes-eval --sampler halton --steps 8                       one run: the report on stdout
    muse shapes-eval --sweep-samplers confidence halton random remask --sweep-steps 4 8 12 16 24 \\
        --per-triple 4 --out docs/sampling --doc docs/sampling.md     the sweep: table, plot (see muse.shapes.sweep)

Registered in the muse command line (muse/cli.py) through `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import asdict
from pathlib import Path

import torch

from .. import arguments, files
from ..pipeline import Pipeline, default_model_dir
from . import sweep
from .domain import parse_caption
from .evaluate import EVAL_SEED, evaluate_adherence, evaluate_prompt, evaluation_prompts, save_grid


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`muse shapes-eval`: prompt adherence of a model of the shapes domain (default: the embedded one)."""
    p = subparsers.add_parser(
        "shapes-eval",
        help="prompt adherence on held-out shapes combinations, judged from pixels",
        description="Generate an image for each held-out shapes prompt and report the fraction of stated attributes "
        "(background, colour, shape, size, position) that a pixel-only judge finds right. With --sweep-samplers "
        "and --sweep-steps: every sampler at every step count, written as a table and a plot under --out.",
    )
    p.add_argument("--model", default=None, help="model folder or id (default: the embedded model)")
    p.add_argument(
        "--per-triple",
        type=arguments.positive_int,
        default=2,
        help="prompts per held-out (colour, background, shape) triple",
    )
    p.add_argument(
        "--seed",
        type=arguments.seed,
        default=None,
        help=f"image i uses seed + i (default: {EVAL_SEED} for the evaluation prompts, 0 with --prompt)",
    )
    p.add_argument(
        "--prompt",
        default=None,
        metavar="CAPTION",
        help="instead of the evaluation prompts: this caption of the shapes language drawn --images times, image i "
        "from seed + i (the images of `muse generate CAPTION --seed SEED --num-images N`)",
    )
    p.add_argument(
        "--images", type=arguments.positive_int, default=32, help="with --prompt: how many seeds (default 32)"
    )
    p.add_argument("--batch-size", type=arguments.positive_int, default=32)
    p.add_argument("--guidance-scale", type=arguments.finite_float, default=None, help="default: the pipeline's")
    p.add_argument(
        "--steps", type=arguments.positive_int, default=None, help="decoding steps (default: the pipeline's)"
    )
    p.add_argument(
        "--temperature",
        type=arguments.temperature,
        default=None,
        help="re-masking temperature T or 'start,end' (default: the pipeline's)",
    )
    p.add_argument(
        "--sampling-temperature",
        type=arguments.sampling_temperature,
        default=None,
        metavar="T|START,END",
        help="divides the logits before each draw; START,END anneals it (default 1)",
    )
    p.add_argument(
        "--masking-schedule", default=None, help="cosine, linear, arccos, power:<p> (default: the pipeline's)"
    )
    p.add_argument(
        "--sampler",
        type=arguments.sampler,
        default=None,
        metavar="NAME[:key=value,...]",
        help="confidence (default), halton, random, remask, with parameters, e.g. remask:eta=0.2",
    )
    p.add_argument(
        "--guidance-interval",
        type=arguments.step_interval,
        default=None,
        metavar="START,END",
        help="guide only the 0-based steps START <= i < END (default: every step)",
    )
    p.add_argument(
        "--guidance-schedule",
        type=arguments.guidance_schedule,
        default=None,
        help="constant (default), linear, cosine, power-cosine[:<exponent>]",
    )
    arguments.add_refine_flags(p)
    p.add_argument(
        "--split",
        default="heldout",
        choices=["heldout", "train"],
        help="heldout: the goal's prompts; train: the training combinations (is an error composition or drawing?)",
    )
    p.add_argument("--json", default=None, help="write the per-image verdicts here (one run)")
    p.add_argument("--grid", default=None, help="write the generated images as one PNG grid here (one run)")
    p.add_argument(
        "--threads",
        type=arguments.positive_int,
        default=None,
        help="torch CPU threads (default: torch's; on a busy machine, 1 gives steadier timings)",
    )
    g = p.add_argument_group("sampler sweep (instead of one run)")
    g.add_argument(
        "--sweep-samplers",
        nargs="+",
        type=arguments.sampler,
        default=None,
        metavar="SAMPLER",
        help="samplers to compare, each NAME[:key=value,...]",
    )
    g.add_argument(
        "--sweep-steps",
        nargs="+",
        type=arguments.positive_int,
        default=None,
        metavar="N",
        help="step counts to run each sampler at",
    )
    g.add_argument(
        "--out", type=Path, default=None, help="folder for table.md, results.csv, results.json, plot.png, plot.svg"
    )
    g.add_argument(
        "--doc", type=Path, default=None, help="also write the table into this Markdown file, between its sweep markers"
    )
    p.set_defaults(func=run_shapes_eval)
    return p


def _options(args) -> dict:
    """The sampling options given on the command line (unset: the pipeline's, i.e. the model's, default)."""
    given = dict(
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.steps,
        temperature=args.temperature,
        sampling_temperature=args.sampling_temperature,
        masking_schedule=args.masking_schedule,
        sampler=args.sampler,
        guidance_interval=args.guidance_interval,
        guidance_schedule=args.guidance_schedule,
        refine_steps=args.refine_steps,
        refine_ratio=args.refine_ratio,
    )
    return {k: v for k, v in given.items() if v is not None}


def run_shapes_eval(args) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.sweep_samplers or args.sweep_steps or args.out or args.doc:
        return run_sampler_sweep(args)
    arguments.check_steps(args.steps, args.guidance_interval, args.sampler)
    seed = args.seed if args.seed is not None else (0 if args.prompt is not None else EVAL_SEED)
    if args.prompt is not None:
        parse_caption(args.prompt)  # a prompt outside the language fails before the model loads
        arguments.check_seed_span(seed, args.images, "--images")
    pipe = Pipeline.from_pretrained(args.model)
    if args.prompt is not None:
        ev = evaluate_prompt(pipe, args.prompt, args.images, seed, args.batch_size, **_options(args))
        print(f"{args.prompt!r}, seeds {seed} to {seed + args.images - 1}:")
    else:
        ev = evaluate_adherence(pipe, args.per_triple, seed, args.batch_size, split=args.split, **_options(args))
    print(ev.report.format())
    print(f"generation: {ev.seconds_per_image:.3f} s per image")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"report": asdict(ev.report), "images": ev.rows()}, f, indent=1)
    if args.grid:
        save_grid(ev.images, args.grid)
    return 0


def _check_sweep_arguments(args) -> None:
    """The sweep's arguments, before the model loads."""
    if not (args.sweep_samplers and args.sweep_steps and args.out):
        raise ValueError("a sweep needs --sweep-samplers, --sweep-steps and --out")
    clashes = [
        flag
        for flag, value in (
            ("--sampler", args.sampler),
            ("--steps", args.steps),
            ("--json", args.json),
            ("--grid", args.grid),
            ("--prompt", args.prompt),
        )
        if value is not None
    ]
    if clashes:
        raise ValueError(f"{', '.join(clashes)}: not with a sweep (it sets the sampler and steps of every cell)")
    sweep.check_grid(args.sweep_samplers, args.sweep_steps, args.guidance_interval)
    if args.doc is not None:
        sweep.doc_parts(args.doc)
    files.check_writable(args.out, folder=True)


def run_sampler_sweep(args) -> int:
    _check_sweep_arguments(args)
    if args.seed is None:
        args.seed = EVAL_SEED
    model = args.model or default_model_dir()
    pipe = Pipeline.from_pretrained(model)
    options = _options(args)
    rows = sweep.run_sweep(
        pipe, args.sweep_samplers, args.sweep_steps, args.per_triple, args.seed, args.batch_size, args.split, **options
    )
    _, prompts = evaluation_prompts(args.per_triple, args.seed, args.split)
    info = sweep.run_info(
        model,
        command_line(args),
        len(prompts),
        args.per_triple,
        args.split,
        args.seed,
        options,
        device=str(pipe.device),
    )
    for path in sweep.write_sweep(rows, info, args.out, args.doc):
        print(path)
    return 0


def _value_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(_value_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def command_line(args) -> str:
    """The sweep's command, rebuilt from the parsed arguments (what the report says re-creates it)."""
    parts = [
        "muse",
        "shapes-eval",
        "--sweep-samplers",
        *map(arguments.sampler_text, args.sweep_samplers),
        "--sweep-steps",
        *map(str, args.sweep_steps),
        "--per-triple",
        str(args.per_triple),
    ]
    optional = [
        ("--model", args.model),
        ("--seed", None if args.seed == EVAL_SEED else args.seed),
        ("--split", None if args.split == "heldout" else args.split),
        ("--batch-size", None if args.batch_size == 32 else args.batch_size),
        ("--threads", args.threads),
        ("--guidance-scale", args.guidance_scale),
        ("--temperature", args.temperature),
        ("--sampling-temperature", args.sampling_temperature),
        ("--masking-schedule", args.masking_schedule),
        ("--guidance-interval", args.guidance_interval),
        ("--guidance-schedule", args.guidance_schedule),
        ("--refine-steps", args.refine_steps),
        ("--refine-ratio", args.refine_ratio),
        ("--out", args.out),
        ("--doc", args.doc),
    ]
    for flag, value in optional:
        if value is not None:
            parts += [flag, _value_text(value)]
    return shlex.join(parts)
