"""The command line: `python -m muse COMMAND ...`.

    python -m muse generate "a photo of a cat" --seed 0 --num-images 4 --out cats/
    python -m muse img2img "a watercolour" --image photo.png --strength 0.6 --out edit.png
    python -m muse inpaint "a red ball" --image photo.png --mask mask.png --out filled.png

Subcommands come from a small registry: `register(add_parser)` adds one, where `add_parser(subparsers)` adds a parser
to an argparse subparsers object and sets `func` (called with the parsed arguments; returns an exit code or None)
with `set_defaults`. Modules named in `COMMAND_MODULES` are imported when the parser is built and registered
through their own `add_parser` function (a missing module is skipped; one that fails to import is skipped with a
warning, so the other commands still work).

Seeds: image i of a run is drawn with its own generator seeded `seed + i`, so any image can be made again alone
(`--seed S+i --num-images 1`). Without --seed a random seed is drawn and printed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import random
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("muse")

AddParser = Callable[[argparse._SubParsersAction], argparse.ArgumentParser]

# modules exposing `add_parser(subparsers)`, registered when present
COMMAND_MODULES = ["muse.evaluation.command", "muse.shapes_judge"]

_REGISTRY: list[AddParser] = []

DTYPES = ("float32", "float16", "bfloat16")


def register(add_parser: AddParser) -> AddParser:
    """Register a subcommand (usable as a decorator)."""
    if add_parser not in _REGISTRY:
        _REGISTRY.append(add_parser)
    return add_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m muse", description="aMUSEd image generation in pure PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in _REGISTRY:
        add_parser(subparsers)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # the module (or its package) is not there: no such subcommand in this installation
            log.warning("the subcommands of %s are unavailable: %s", name, e)
            continue
        except Exception as e:  # a broken extra command must not take generation down with it
            log.warning("the subcommands of %s are unavailable: %s: %s", name, type(e).__name__, e)
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


# --- the generation commands -----------------------------------------------------------------------------------------


def _temperature(text: str) -> float | tuple[float, float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"a temperature is T or 'start,end' (for example 2,0), got {text!r}")
    return values[0] if len(values) == 1 else (values[0], values[1])


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded default model)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (default: the empty prompt)")
    # None = the model's declared default, else the reference's (12 steps, guidance 10, temperature 2,0)
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: the model's, else 12)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance, on when > 1 (default: the model's, else 10)")
    p.add_argument("--temperature", type=_temperature, default=None,
                   help="re-masking temperature T or 'start,end' (default: the model's, else 2,0)")
    p.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default: a random seed, printed)")
    p.add_argument("--num-images", type=int, default=1, help="images to make (default 1)")
    p.add_argument("--out", type=Path, default=None, help="a .png file, or a folder (default: muse-<command>.png)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default float32)")
    p.add_argument("--variant", default=None, help="weight file variant of a diffusers folder, e.g. fp16")


@register
def add_generate(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="text to image", description="Generate images from a text prompt.")
    _add_common(p)
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 16 (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 16 (default: the model's size)")
    p.set_defaults(func=run_generate)
    return p


@register
def add_img2img(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("img2img", help="image to image", description="Re-generate an image guided by a prompt.")
    _add_common(p)
    p.add_argument("--image", type=Path, required=True, help="the starting image (sides multiples of 16 px)")
    p.add_argument("--strength", type=float, default=0.5, help="in (0, 1]: how much to change (default 0.5)")
    p.set_defaults(func=run_img2img)
    return p


@register
def add_inpaint(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("inpaint", help="inpainting", description="Repaint the white area of a mask.")
    _add_common(p)
    p.add_argument("--image", type=Path, required=True, help="the image (sides multiples of 16 px)")
    p.add_argument("--mask", type=Path, required=True, help="the mask, same size as the image: white = repaint")
    p.add_argument("--strength", type=float, default=1.0, help="in (0, 1] (default 1)")
    p.add_argument("--paste-unmasked", action="store_true", help="put the original pixels back outside the mask")
    p.set_defaults(func=run_inpaint)
    return p


def _load(args):
    """Check the output arguments (before the slow part), then load the pipeline."""
    import torch

    from .pipeline import Pipeline

    _output_paths(_out(args), args.num_images)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    log.info("loading %s", args.model or "the embedded default model")
    return Pipeline.from_pretrained(args.model, dtype=dtype, device=args.device, variant=args.variant)


def _options(args, pipe) -> dict:
    import torch

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    log.info("seed %d", seed)
    given = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, temperature=args.temperature)
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
    from .images import load_image

    image = load_image(args.image)
    pipe = _load(args)
    images = pipe.img2img(args.prompt, image, strength=args.strength, **_options(args, pipe))
    _report(save_images(images, _out(args)))
    return 0


def run_inpaint(args) -> int:
    from .images import MASK_MODES, load_image

    image = load_image(args.image)
    mask = load_image(args.mask, mode=None)
    if mask.mode not in MASK_MODES:
        mask = mask.convert("L")
    pipe = _load(args)
    images = pipe.inpaint(args.prompt, image, mask, strength=args.strength, paste_unmasked=args.paste_unmasked,
                          **_options(args, pipe))
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
    from .images import make_grid

    paths, grid = _output_paths(out, len(images))
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, paths):
        image.save(path)
    if grid is not None:
        make_grid(images).save(grid)
        paths.append(grid)
    return paths


def _report(paths: list[Path]) -> None:
    for path in paths:
        print(path)
