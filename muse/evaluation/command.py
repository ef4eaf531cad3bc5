"""`muse evaluate`: the command line of the evaluation.

    muse evaluate --prompts prompts.txt --out eval/ --guidance-scales 1 2 4 8 10 \
        --clip-model ViT-L-14 --clip-weights open_clip_pytorch_model.bin \
        --fid-reference coco_val/ --fid-weights weights-inception-2015-12-05-6726825d.pth
    muse evaluate ... --samplers confidence halton random remask --steps 4 8 12 16 24 --guidance-scales 10

Registered in the muse command line (muse/cli.py) through `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ..arguments import DTYPES, finite_float, guidance_schedule, optional_step_interval, sampler, temperature_pair
from .clip_score import ClipScorer
from .errors import MissingWeightsError
from .evaluate import evaluate
from .fid import InceptionFID
from .generate import PipelineGenerator
from .prompts import load_prompts
from .sweep import expand_grid


def _optional(text: str) -> str | None:
    """'none' / 'default' -> None (no adapter / the model's own schedule)."""
    return None if text.lower() in ("none", "default") else text


def _optional_sampler(text: str):
    """'default' -> None (the model's sampler), else a sampler NAME[:key=value,...]."""
    return None if text.lower() == "default" else sampler(text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `evaluate` subcommand to an argparse subparsers object; its `func` default runs it."""
    p = subparsers.add_parser(
        "evaluate",
        help="CLIP score, FID and time per image over a grid of sampling settings",
        description="Generate images for a prompt set over a grid of settings (resumable: images already in --out "
        "are not generated again), then write results.csv / results.json, results_plot.png and a grid per setting.",
    )
    configure_parser(p)
    p.set_defaults(func=run)
    return p


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompts",
        required=True,
        help="a text file (one prompt per line), a .json/.jsonl/.csv of captions, "
        "a folder saved by datasets' save_to_disk, or hf:<dataset name>",
    )
    g.add_argument(
        "--prompt-column", default=None, help="column / key holding the prompt (default: caption, prompt or text)"
    )
    g.add_argument("--split", default="train", help="dataset split (Hugging Face datasets)")
    g.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")

    g = p.add_argument_group("the grid of settings (every combination is evaluated)")
    g.add_argument("--model", default=None, help="model folder or hub id (default: the embedded default model)")
    g.add_argument("--checkpoints", nargs="+", default=None, help="several models to compare (instead of --model)")
    g.add_argument("--loras", nargs="+", type=_optional, default=[None], help="LoRA adapter files; 'none' = no adapter")
    g.add_argument("--guidance-scales", nargs="+", type=finite_float, default=[10.0])
    g.add_argument("--steps", nargs="+", type=int, default=[12], help="numbers of decoding steps")
    g.add_argument(
        "--temperatures",
        nargs="+",
        type=temperature_pair,
        default=[(2.0, 0.0)],
        help="re-masking temperatures 'start,end'",
    )
    g.add_argument(
        "--masking-schedules",
        nargs="+",
        type=_optional,
        default=[None],
        help="cosine, linear, arccos, power:<p>; 'default' = the model's",
    )
    g.add_argument(
        "--guidance-schedules",
        nargs="+",
        type=guidance_schedule,
        default=["constant"],
        help="constant, linear, cosine, power-cosine[:<exponent>]",
    )
    g.add_argument(
        "--samplers",
        nargs="+",
        type=_optional_sampler,
        default=[None],
        metavar="SAMPLER",
        help="confidence, halton, random, remask, each NAME[:key=value,...] (e.g. remask:eta=0.2); "
        "'default' = the model's (confidence)",
    )
    g.add_argument(
        "--guidance-intervals",
        nargs="+",
        type=optional_step_interval,
        default=[None],
        metavar="START,END",
        help="guide only the 0-based steps START <= i < END; 'none' = every step",
    )
    g.add_argument("--seeds", nargs="+", type=int, default=[0], help="one image per prompt and seed")

    g = p.add_argument_group("generation")
    g.add_argument("--out", required=True, type=Path, help="output folder (reused to resume)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--dtype", choices=DTYPES, default=None, help="the model's dtype (default: as saved)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")

    g = p.add_argument_group("metrics")
    g.add_argument(
        "--clip-model",
        default=None,
        help="open_clip model name (e.g. ViT-L-14) or hf-hub:<repo>; CLIP score is computed when given",
    )
    g.add_argument(
        "--clip-weights",
        default=None,
        help="local open_clip checkpoint file, or a pretrained tag (e.g. openai) to download",
    )
    g.add_argument(
        "--fid-reference", type=Path, default=None, help="folder of reference images; FID is computed when given"
    )
    g.add_argument(
        "--fid-weights", type=Path, default=None, help="weights-inception-2015-12-05-6726825d.pth (torch-fidelity)"
    )
    g.add_argument("--metrics-batch-size", type=int, default=32)
    g.add_argument("--offline", action="store_true", help="never try to download weights (also when HF_HUB_OFFLINE=1)")
    g.add_argument("--max-grid-images", type=int, default=64)
    return p


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = load_prompts(args.prompts, args.prompt_column, args.split, args.num_prompts)
    checkpoints = (
        [_model_ref(c) for c in args.checkpoints]
        if args.checkpoints
        else [_model_ref(args.model) if args.model else None]
    )
    settings = expand_grid(
        args.guidance_scales,
        args.steps,
        args.temperatures,
        args.masking_schedules,
        args.guidance_schedules,
        checkpoints,
        [_model_ref(x) if x else None for x in args.loras],
        args.samplers,
        args.guidance_intervals,
    )
    # the grid, then the metrics: a bad setting or missing weights stop the run before anything is generated
    try:
        clip = (
            ClipScorer(args.clip_model, args.clip_weights, device, args.metrics_batch_size, args.offline)
            if args.clip_model
            else None
        )
        fid = (
            InceptionFID(args.fid_weights, device, args.metrics_batch_size, args.offline)
            if args.fid_reference
            else None
        )
    except MissingWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else None
    generator = PipelineGenerator(dtype=dtype, device=device, negative_prompt=args.negative_prompt)
    context = {"dtype": args.dtype, "device": torch.device(device).type, "negative_prompt": args.negative_prompt}
    rows = evaluate(
        generator,
        settings,
        prompts,
        args.seeds,
        args.out,
        batch_size=args.batch_size,
        clip=clip,
        fid=fid,
        fid_reference=args.fid_reference,
        context=context,
        prompt_source=str(args.prompts),
        max_grid_images=args.max_grid_images,
    )
    _print_table(rows)
    print(f"wrote {args.out / 'results.csv'}, results.json, results_plot.png and grids/")
    return 0


def _model_ref(ref: str) -> str:
    """A local path made absolute (so the setting's key does not depend on the working folder); a hub id as is."""
    path = Path(ref)
    return str(path.resolve()) if path.exists() else ref


def _print_table(rows: list[dict]) -> None:
    def cell(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"{'setting':60s} {'images':>6s} {'s/img':>8s} {'CLIP':>7s} {'FID':>8s}")
    for r in rows:
        print(
            f"{r['label'][:60]:60s} {r['num_images']:6d} {cell(r['seconds_per_image'], '8.3f')} "
            f"{cell(r['clip_score'], '7.2f')} {cell(r['fid'], '8.2f')}"
        )
