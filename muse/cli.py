"""The command line: `muse COMMAND ...` (the console script; `python -m muse` is the same).

    muse generate "a red circle on a blue background" --out red.png        the embedded model, offline
    muse generate "a photo of a cat" --model amused/amused-256 --seed 0 --num-images 4 --out cats/
    muse img2img "a watercolour" --image photo.png --strength 0.6 --out edit.png
    muse inpaint "a red ball" --image photo.png --mask mask.png --out filled.png
    muse generate "a blue circle on a yellow background" --sampler remask:eta=0.2 --guidance-interval 2,10
    muse evaluate ...        CLIP score, FID and seconds per image over a grid of settings (muse.evaluation)
    muse shapes-eval ...     prompt adherence of a shapes-domain model, judged from pixels (muse.shapes)
    muse convert SRC DST     checkpoints between formats (the same as `python -m convert`)
    muse train ...           fine-tuning with the reference script's flags (the same as `python -m train`)
    muse train-default ...   retrain the embedded model from nothing (the recipe train.default_model)

Subcommands are argparse parsers added by `add_parser(subparsers)` functions (`register` adds one more). The last
three hand their arguments to their own package's parser unchanged; this dispatcher imports those packages only
when one of them runs, so generation never loads the training code.

Seeds: image i of a run is drawn with its own generator seeded `seed + i`, so any image can be made again alone
(`--seed S+i --num-images 1`). Without --seed a random seed is drawn and printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from . import arguments, files
from .evaluation import command as evaluation_command
from .images import MASK_MODES, load_image, make_grid
from .pipeline import Pipeline
from .shapes import command as shapes_command

log = logging.getLogger("muse")

AddParser = Callable[[argparse._SubParsersAction], argparse.ArgumentParser]

PROG = "muse"


# --- the commands of other packages, run with their own parsers -------------------------------------------------------


def run_convert(argv: list[str]) -> int:
    from convert.__main__ import main  # the dispatcher's upward reach: only when `muse convert` runs

    return main(argv, prog=f"{PROG} convert")


def run_train(argv: list[str]) -> int:
    from train.cli import main  # the dispatcher's upward reach: only when `muse train` runs

    return main(argv, prog=f"{PROG} train")


def run_train_default(argv: list[str]) -> int:
    from train.default_model import main  # the dispatcher's upward reach: only when `muse train-default` runs

    return main(argv, prog=f"{PROG} train-default")


# name -> (runner, help): their arguments go to the package's own parser untouched
PASSTHROUGH: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "convert": (run_convert, "convert checkpoints: published folders or hub ids, open-muse, ours, back to diffusers"),
    "train": (run_train, "fine-tune the U-ViT (full, 8-bit Adam, LoRA) with the reference script's flags"),
    "train-default": (run_train_default, "retrain the embedded shapes model from nothing (the recipe)"),
}


def _add_passthrough(subparsers, name: str, help: str) -> None:
    """A stub so that `muse --help` lists the command; `main` hands its arguments on before argparse sees them."""
    subparsers.add_parser(name, help=help, add_help=False)


# --- the parser ---------------------------------------------------------------------------------------------------------

_REGISTRY: list[AddParser] = []


def register(add_parser: AddParser) -> AddParser:
    """Register a subcommand (usable as a decorator): `add_parser(subparsers)` adds a parser and sets `func` (called
    with the parsed arguments; returns an exit code or None) with `set_defaults`."""
    if add_parser not in _REGISTRY:
        _REGISTRY.append(add_parser)
    return add_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="aMUSEd in pure PyTorch: generation, evaluation, conversion and training."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: MUSE_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in _REGISTRY:
        add_parser(subparsers)
    for name, (_, help) in PASSTHROUGH.items():
        _add_passthrough(subparsers, name, help)
    return parser


def _passthrough_command(argv: list[str]) -> int | None:
    """Index of a hand-on command in argv (after the global options), or None."""
    for i, arg in enumerate(argv):
        if arg in ("-v", "--verbose", "--debug"):
            continue
        return i if arg in PASSTHROUGH else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    at = _passthrough_command(argv)
    if at is not None:
        runner, _ = PASSTHROUGH[argv[at]]
        return runner(argv[at + 1 :]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    debug = args.debug or os.environ.get("MUSE_DEBUG", "") not in ("", "0")
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as e:  # bad input, a missing or unwritable path, a full disk: one line, no traceback
        if debug:
            raise
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def error_message(error: BaseException) -> str:
    """One line saying what went wrong (an OSError as 'path: reason')."""
    if isinstance(error, OSError) and error.strerror and not str(error).startswith(str(error.filename or "\0")):
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error) or type(error).__name__
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


# --- the generation commands -----------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded default model)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the empty prompt)")
    # None = the model's declared default, else the reference's (12 steps, guidance 10, temperature 2,0)
    p.add_argument(
        "--steps", type=arguments.positive_int, default=None, help="decoding steps (default: the model's, else 12)"
    )
    p.add_argument(
        "--guidance-scale",
        type=arguments.finite_float,
        default=None,
        help="classifier-free guidance, on when > 1 (default: the model's, else 10)",
    )
    p.add_argument(
        "--temperature",
        type=arguments.temperature,
        default=None,
        help="re-masking temperature T or 'start,end' (default: the model's, else 2,0)",
    )
    p.add_argument(
        "--sampler",
        type=arguments.sampler,
        default=None,
        metavar="NAME[:key=value,...]",
        help="which positions stay masked after each step: confidence (the reference, default), halton, "
        "random, remask; parameters after a colon, e.g. remask:eta=0.2,strategy=cap or "
        "halton:random_offset=true (see docs/sampling.md)",
    )
    p.add_argument(
        "--guidance-interval",
        type=arguments.step_interval,
        default=None,
        metavar="START,END",
        help="guide only the 0-based steps START <= i < END of the --steps (default: every step)",
    )
    p.add_argument(
        "--guidance-schedule",
        type=arguments.guidance_schedule,
        default=None,
        help="constant (default), linear, cosine, power-cosine or power-cosine:<exponent>",
    )
    p.add_argument(
        "--sampling-temperature",
        type=arguments.sampling_temperature,
        default=None,
        metavar="T|START,END",
        help="divides the logits before each token draw; START,END anneals it over the steps (default 1)",
    )
    arguments.add_refine_flags(p)
    p.add_argument(
        "--seed",
        type=arguments.seed,
        default=None,
        help="image i uses seed + i, in [0, 2**63) (default: a random seed, printed)",
    )
    p.add_argument("--num-images", type=arguments.positive_int, default=1, help="images to make (default 1)")
    p.add_argument("--out", type=Path, default=None, help="a .png file, or a folder (default: muse-<command>.png)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.add_argument("--dtype", choices=arguments.DTYPES, default=None, help="weights' dtype (default float32)")
    p.add_argument("--variant", default=None, help="weight file variant of a diffusers folder, e.g. fp16")


@register
def add_generate(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="text to image", description="Generate images from a text prompt.")
    _add_common(p)
    p.add_argument(
        "--height",
        type=arguments.positive_int,
        default=None,
        help="pixels, a multiple of 16 (default: the model's size)",
    )
    p.add_argument(
        "--width",
        type=arguments.positive_int,
        default=None,
        help="pixels, a multiple of 16 (default: the model's size)",
    )
    p.set_defaults(func=run_generate)
    return p


@register
def add_img2img(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("img2img", help="image to image", description="Re-generate an image guided by a prompt.")
    _add_common(p)
    p.add_argument("--image", type=Path, required=True, help="the starting image (sides multiples of 16 px)")
    p.add_argument(
        "--strength", type=arguments.finite_float, default=0.5, help="in (0, 1]: how much to change (default 0.5)"
    )
    p.set_defaults(func=run_img2img)
    return p


@register
def add_inpaint(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inpaint", help="inpainting", description="Repaint the white area of a mask.")
    _add_common(p)
    p.add_argument("--image", type=Path, required=True, help="the image (sides multiples of 16 px)")
    p.add_argument("--mask", type=Path, required=True, help="the mask, same size as the image: white = repaint")
    p.add_argument("--strength", type=arguments.finite_float, default=1.0, help="in (0, 1] (default 1)")
    p.add_argument("--paste-unmasked", action="store_true", help="put the original pixels back outside the mask")
    p.set_defaults(func=run_inpaint)
    return p


def _load(args):
    """Check the output location and the device (before the slow part), then load the pipeline."""
    paths, grid = _output_paths(_out(args), args.num_images)
    for path in paths + ([grid] if grid is not None else []):
        files.check_writable(path)
    arguments.check_device(args.device)
    arguments.check_steps(args.steps, args.guidance_interval, args.sampler)  # without --steps: the pipeline checks
    if args.seed is not None:
        arguments.check_seed_span(args.seed, args.num_images, "--num-images")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    log.info("loading %s", args.model or "the embedded default model")
    return Pipeline.from_pretrained(args.model, dtype=dtype, device=args.device, variant=args.variant)


def _options(args, pipe) -> dict:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    log.info("seed %d", seed)
    given = dict(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        temperature=args.temperature,
        sampler=args.sampler,
        guidance_interval=args.guidance_interval,
        guidance_schedule=args.guidance_schedule,
        sampling_temperature=args.sampling_temperature,
        refine_steps=args.refine_steps,
        refine_ratio=args.refine_ratio,
    )
    return dict(
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        generator=[torch.Generator(device=pipe.device).manual_seed(seed + i) for i in range(args.num_images)],
        **{k: v for k, v in given.items() if v is not None},  # unset: the pipeline's (model's) default
    )


def run_generate(args) -> int:
    pipe = _load(args)
    images = pipe(args.prompt, height=args.height, width=args.width, **_options(args, pipe))
    _report(save_images(images, _out(args)))
    return 0


def run_img2img(args) -> int:
    image = load_image(args.image)
    pipe = _load(args)
    images = pipe.img2img(args.prompt, image, strength=args.strength, **_options(args, pipe))
    _report(save_images(images, _out(args)))
    return 0


def run_inpaint(args) -> int:
    image = load_image(args.image)
    mask = load_image(args.mask, mode=None)
    if mask.mode not in MASK_MODES:
        mask = mask.convert("L")
    pipe = _load(args)
    images = pipe.inpaint(
        args.prompt, image, mask, strength=args.strength, paste_unmasked=args.paste_unmasked, **_options(args, pipe)
    )
    _report(save_images(images, _out(args)))
    return 0


def _out(args) -> Path:
    return args.out or Path(f"muse-{args.command}.png")


def _output_paths(out: Path, n: int) -> tuple[list[Path], Path | None]:
    """Where `n` images and their grid go (see `save_images`)."""
    if n < 1:
        raise ValueError(f"--num-images must be >= 1, got {n}")
    out = Path(out)
    if out.suffix and out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file or a folder, got {out}")
    if out.suffix:
        paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{i}.png") for i in range(n)]
        return paths, (out if n > 1 else None)
    return [out / f"image-{i:03d}.png" for i in range(n)], (out / "grid.png" if n > 1 else None)


def save_images(images, out: Path) -> list[Path]:
    """Write PNGs. `out` ending in .png: one image is written there; several are written as <stem>-<i>.png beside
    it and their grid goes to `out`. Any other `out` is a folder: image-<i>.png, plus grid.png for several."""
    paths, grid = _output_paths(out, len(images))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):  # each to a temporary file renamed into place: an old file is never lost
        files.save_png_atomic(image, path)
    if grid is not None:
        files.save_png_atomic(make_grid(images), grid)
        paths.append(grid)
    return paths


def _report(paths: list[Path]) -> None:
    for path in paths:
        print(path)


register(evaluation_command.add_parser)
register(shapes_command.add_parser)
