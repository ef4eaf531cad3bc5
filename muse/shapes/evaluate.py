"""Prompt adherence of a shapes model: generate an image for each evaluation prompt, judge it from its pixels, and
report the fraction of stated attributes that are right (`muse shapes-eval`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import PIL.Image
import torch
from tqdm.auto import tqdm

from ..arguments import finite_float, positive_int
from ..arguments import temperature as temperature_arg
from ..pipeline import Pipeline
from .domain import SPLITS, captions, sample_scenes
from .judge import AdherenceReport, Verdict, judge, score, summarise

EVAL_SEED = 2024  # the held-out prompts and the generators of the published adherence number


@dataclass
class Evaluation:
    report: AdherenceReport
    prompts: list[str]
    expected: list[dict[str, str]]
    verdicts: list[Verdict]
    marks: list[dict[str, bool]]
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]

    def rows(self) -> list[dict]:
        """One JSON-ready record per image."""
        return [
            {"prompt": p, "expected": e, "judged": v.as_dict(), "right": m}
            for p, e, v, m in zip(self.prompts, self.expected, self.verdicts, self.marks)
        ]


def evaluation_prompts(per_triple: int = 2, seed: int = EVAL_SEED, split: str = "heldout"):
    """The evaluation set: each (colour, background, shape) triple of the split `per_triple` times, with size and
    position stated at random (each with probability 1/2). Returns (scenes, prompts). The goal's split is "heldout";
    "train" (the training triples) is a diagnosis: errors there are the model's drawing, not composition."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    scenes = sample_scenes(per_triple * len(SPLITS[split]), seed, split=split, balanced=True)
    return scenes, captions(scenes)


@torch.no_grad()
def evaluate_adherence(pipe, per_triple: int = 2, seed: int = EVAL_SEED, batch_size: int = 32, progress: bool = True,
                       split: str = "heldout", **options) -> Evaluation:
    """Generate one image per evaluation prompt of `split` with `pipe` (image i from its own generator seeded
    seed + i; other sampling options at the pipeline's defaults unless given), judge each, and score the stated
    attributes."""
    scenes, prompts = evaluation_prompts(per_triple, seed, split)
    images = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="shapes-eval", disable=not progress):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, generator=gens, output_type="np", progress_bar=False, **options)  # (B, H, W, 3) in [0, 1]
        images.append(torch.from_numpy(out).permute(0, 3, 1, 2).float())
    images = torch.cat(images)
    verdicts = judge(images)
    expected = [scenes.attributes(i) for i in range(len(scenes))]
    marks = [score(e, v) for e, v in zip(expected, verdicts)]
    return Evaluation(summarise(marks), prompts, expected, verdicts, marks, images)


def add_parser(subparsers):
    """`python -m muse shapes-eval`: prompt adherence of a model of the shapes domain (default: the embedded one)."""
    p = subparsers.add_parser(
        "shapes-eval",
        help="prompt adherence on held-out shapes combinations, judged from pixels",
        description="Generate an image for each held-out shapes prompt and report the fraction of stated attributes "
        "(background, colour, shape, size, position) that a pixel-only judge finds right.",
    )
    p.add_argument("--model", default=None, help="model folder or id (default: the embedded model)")
    p.add_argument("--per-triple", type=positive_int, default=2, help="prompts per held-out (colour, background, shape) triple")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--guidance-scale", type=finite_float, default=None, help="default: the pipeline's")
    p.add_argument("--steps", type=positive_int, default=None, help="decoding steps (default: the pipeline's)")
    p.add_argument("--temperature", type=temperature_arg, default=None,
                   help="re-masking temperature T or 'start,end' (default: the pipeline's)")
    p.add_argument("--sampling-temperature", type=finite_float, default=None, help="divides the logits before each draw (default 1)")
    p.add_argument("--masking-schedule", default=None, help="cosine, linear, arccos, power:<p> (default: the pipeline's)")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"],
                   help="heldout: the goal's prompts; train: the training combinations (is an error composition or drawing?)")
    p.add_argument("--json", default=None, help="write the per-image verdicts here")
    p.add_argument("--grid", default=None, help="write the generated images as one PNG grid here")
    p.set_defaults(func=run_shapes_eval)
    return p


def run_shapes_eval(args) -> int:
    pipe = Pipeline.from_pretrained(args.model)
    given = dict(guidance_scale=args.guidance_scale, num_inference_steps=args.steps, temperature=args.temperature,
                 sampling_temperature=args.sampling_temperature, masking_schedule=args.masking_schedule)
    options = {k: v for k, v in given.items() if v is not None}  # unset: the pipeline's (model's) default
    ev = evaluate_adherence(pipe, args.per_triple, args.seed, args.batch_size, split=args.split, **options)
    print(ev.report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"report": asdict(ev.report), "images": ev.rows()}, f, indent=1)
    if args.grid:
        save_grid(ev.images, args.grid)
    return 0


def save_grid(images: torch.Tensor, path, columns: int = 8, pad: int = 2) -> None:
    """images (N, 3, H, W) in [0, 1] -> one PNG of a grid with `pad` white pixels between images."""
    n, _, H, W = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.ones(3, rows * (H + pad) + pad, columns * (W + pad) + pad)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = images[i]
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    PIL.Image.fromarray(array).save(path)
