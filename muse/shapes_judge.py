"""A judge for the synthetic shapes domain (`train.shapes`): reads an image's attributes from its pixels alone.

For each image (3, H, W) in [0, 1]:
  1. background colour: the per-channel median of the outermost ring of pixels (shapes never touch it), named by the
     nearest palette colour;
  2. shape colour: the median of the pixels that differ clearly from the background, named likewise;
  3. the shape's coverage alpha per pixel: the pixel's position on the segment background -> shape colour (this
     undoes the anti-aliasing exactly on rendered images); the shape is the largest 8-connected region of
     alpha > 0.5 (stray specks in generated images are ignored);
  4. its extents, continuously: the width is the sum over columns of the column's largest coverage (the fraction of
     that column the shape spans), the height likewise over rows;
  5. shape class from how much of that width x height box the shape fills (square 1, circle pi/4, triangle 1/2) and
     from where its mass sits: an upward triangle's centroid lies h/6 below the box's centre, a circle's or a
     square's on it. The second test survives rounded corners (a small triangle through the VQ-GAN fills 0.6-0.7 of
     its box, which fill alone calls a circle);
  6. size from the larger extent, position from the box's centre on the 3x3 grid.

`judge(images)` returns one `Verdict` per image; `score(expected, verdict)` marks each stated attribute right or
wrong; `evaluate_adherence(pipe, ...)` generates images for held-out prompts and reports the fraction right.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from train.shapes import COLOURS, COLOUR_NAMES, IMAGE_SIZE, POSITION_NAMES, POSITIONS, SHAPES, SIZES, SIZE_NAMES

# A pixel belongs to the shape's colour estimate when it is this far (RGB distance, [0, 1] units) from the
# background: about half the smallest distance between two palette colours (orange and yellow, 0.34).
FOREGROUND_DISTANCE = 0.17
# bounding-box fill ratio boundaries: triangle (1/2) | circle (pi/4 = 0.785) | square (1)
FILL_TRIANGLE_CIRCLE = 0.5 * (0.5 + math.pi / 4)
FILL_CIRCLE_SQUARE = 0.5 * (math.pi / 4 + 1.0)
# centroid below the box's centre, in box heights: triangle 1/6 | circle and square 0
DROP_TRIANGLE = 1 / 12
MIN_SHAPE_PIXELS = 6  # fewer pixels than this in the largest region: no shape


@dataclass
class Verdict:
    """What the judge read off one image. Attributes are None when no shape was found."""

    background: str
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    fill: float  # area / bounding-box area (0 when no shape)
    drop: float  # (centroid row - box centre row) / box height: 1/6 for an upward triangle, 0 for a circle or square
    bbox: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) of the pixels with coverage > 1/2, inclusive

    def as_dict(self) -> dict:
        return asdict(self)


def _palette(device) -> torch.Tensor:
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device) / 255.0  # (K, 3)


def _nearest_colour(rgb: torch.Tensor) -> str:
    """rgb (3,) in [0, 1] -> the name of the nearest palette colour."""
    return COLOUR_NAMES[int((_palette(rgb.device) - rgb).pow(2).sum(1).argmin())]


def _largest_region(mask: torch.Tensor) -> torch.Tensor:
    """mask (H, W) bool -> the largest 8-connected region of it, (H, W) bool (label propagation by max-pooling)."""
    H, W = mask.shape
    labels = torch.arange(1, H * W + 1, dtype=torch.float32, device=mask.device).view(1, 1, H, W) * mask
    m = mask.view(1, 1, H, W).float()
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * m
        if torch.equal(grown, labels):
            break
        labels = grown
    flat = labels.view(-1).long()
    counts = torch.bincount(flat, minlength=H * W + 1)
    counts[0] = 0
    return (labels.view(H, W).long() == int(counts.argmax())) & mask


def _classify_shape(fill: float, drop: float) -> str:
    if fill < FILL_TRIANGLE_CIRCLE or drop > DROP_TRIANGLE:
        return "triangle"
    return "circle" if fill < FILL_CIRCLE_SQUARE else "square"


def _classify_size(half_side: float) -> str:
    halves = torch.tensor(list(SIZES.values()))
    return SIZE_NAMES[int((halves - half_side).abs().argmin())]


def _classify_position(cx: float, cy: float, width: int, height: int) -> str:
    col = min(2, max(0, int(3 * cx / width)))
    row = min(2, max(0, int(3 * cy / height)))
    return next(name for name, rc in POSITIONS.items() if rc == (row, col))


def judge_one(image: torch.Tensor) -> Verdict:
    """image (3, H, W) float in [0, 1] -> Verdict."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    img = image.detach().float().clamp(0, 1)
    _, H, W = img.shape
    ring = torch.cat([img[:, 0, :], img[:, -1, :], img[:, 1:-1, 0], img[:, 1:-1, -1]], dim=1)  # (3, perimeter)
    bg = ring.median(dim=1).values  # (3,)
    dist = (img - bg.view(3, 1, 1)).pow(2).sum(0).sqrt()  # (H, W)
    candidates = dist > FOREGROUND_DISTANCE
    background = _nearest_colour(bg)
    none = Verdict(background, None, None, None, None, 0.0, 0.0, None)
    if int(candidates.sum()) < MIN_SHAPE_PIXELS:
        return none
    fg = img[:, candidates].median(dim=1).values  # (3,)
    # alpha: where each pixel lies on the segment bg -> fg
    axis = fg - bg
    alpha = (((img - bg.view(3, 1, 1)) * axis.view(3, 1, 1)).sum(0) / axis.pow(2).sum().clamp(min=1e-6)).clamp(0, 1)
    region = _largest_region(alpha > 0.5)
    if int(region.sum()) < MIN_SHAPE_PIXELS:
        return none
    # the shape's coverage: alpha inside the region grown by one pixel (so its anti-aliased rim counts)
    near = F.max_pool2d(region.float().view(1, 1, H, W), 3, stride=1, padding=1).view(H, W) > 0
    cover = alpha * near  # (H, W)
    # continuous extents: a column's (row's) largest coverage is the fraction of it the shape spans
    col, row = cover.amax(dim=0), cover.amax(dim=1)  # (W,), (H,)
    w, h, area = float(col.sum()), float(row.sum()), float(cover.sum())
    xs_c, ys_c = torch.arange(W) + 0.5, torch.arange(H) + 0.5  # pixel centres
    fill = area / max(w * h, 1e-6)
    cx = float((col * xs_c).sum()) / max(w, 1e-6)
    cy = float((row * ys_c).sum()) / max(h, 1e-6)  # the box's centre row
    centroid_y = float((cover.sum(dim=1) * ys_c).sum()) / max(area, 1e-6)
    drop = (centroid_y - cy) / max(h, 1e-6)
    ys, xs = region.nonzero(as_tuple=True)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
    return Verdict(
        background=background,
        colour=_nearest_colour(fg),
        shape=_classify_shape(fill, drop),
        size=_classify_size(max(w, h) / 2 * IMAGE_SIZE / max(H, W)),
        position=_classify_position(cx, cy, W, H),
        fill=fill,
        drop=drop,
        bbox=(x0, y0, x1, y1),
    )


def judge(images: torch.Tensor) -> list[Verdict]:
    """images (B, 3, H, W) float in [0, 1] -> one Verdict per image."""
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return [judge_one(im) for im in images]


def score(expected: dict[str, str], verdict: Verdict) -> dict[str, bool]:
    """Mark each stated attribute (keys among background, colour, shape, size, position) right or wrong."""
    unknown = set(expected) - {"background", "colour", "shape", "size", "position"}
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    return {k: getattr(verdict, k) == v for k, v in expected.items()}


@dataclass
class AdherenceReport:
    """Prompt adherence: the fraction of stated attributes the judge found right, overall and per attribute."""

    accuracy: float  # right / stated, over all attributes of all images
    per_attribute: dict[str, float]
    all_right: float  # fraction of images with every stated attribute right
    num_images: int
    num_attributes: int

    def format(self) -> str:
        parts = ", ".join(f"{k} {v:.1%}" for k, v in sorted(self.per_attribute.items()))
        return (
            f"adherence {self.accuracy:.1%} of {self.num_attributes} attributes over {self.num_images} images "
            f"({parts}); images entirely right {self.all_right:.1%}"
        )


def summarise(marks: list[dict[str, bool]]) -> AdherenceReport:
    """Per-image marks (from `score`) -> AdherenceReport."""
    if not marks:
        raise ValueError("no images to summarise")
    per: dict[str, list[bool]] = {}
    for m in marks:
        for k, ok in m.items():
            per.setdefault(k, []).append(ok)
    total = sum(len(v) for v in per.values())
    return AdherenceReport(
        accuracy=sum(sum(v) for v in per.values()) / total,
        per_attribute={k: sum(v) / len(v) for k, v in per.items()},
        all_right=sum(all(m.values()) for m in marks) / len(marks),
        num_images=len(marks),
        num_attributes=total,
    )


CHANCE = {
    "background": 1 / len(COLOUR_NAMES),
    "colour": 1 / len(COLOUR_NAMES),
    "shape": 1 / len(SHAPES),
    "size": 1 / len(SIZE_NAMES),
    "position": 1 / len(POSITION_NAMES),
}  # what a judge scores on images that ignore the prompt, for uniform attributes


# --- the evaluation command ------------------------------------------------------------------------------------------

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
    from train.shapes import SPLITS, captions, sample_scenes

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
    from tqdm.auto import tqdm

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
    from muse.cli import _temperature as temperature_arg  # the generation commands' "T or start,end"

    p = subparsers.add_parser(
        "shapes-eval",
        help="prompt adherence on held-out shapes combinations, judged from pixels",
        description="Generate an image for each held-out shapes prompt and report the fraction of stated attributes "
        "(background, colour, shape, size, position) that a pixel-only judge finds right.",
    )
    p.add_argument("--model", default=None, help="model folder or id (default: the embedded model)")
    p.add_argument("--per-triple", type=int, default=2, help="prompts per held-out (colour, background, shape) triple")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--steps", type=int, default=None, help="decoding steps (default: the pipeline's)")
    p.add_argument("--temperature", type=temperature_arg, default=None,
                   help="re-masking temperature T or 'start,end' (default: the pipeline's)")
    p.add_argument("--sampling-temperature", type=float, default=None, help="divides the logits before each draw (default 1)")
    p.add_argument("--masking-schedule", default=None, help="cosine, linear, arccos, power:<p> (default: the pipeline's)")
    p.add_argument("--split", default="heldout", choices=["heldout", "train"],
                   help="heldout: the goal's prompts; train: the training combinations (is an error composition or drawing?)")
    p.add_argument("--json", default=None, help="write the per-image verdicts here")
    p.add_argument("--grid", default=None, help="write the generated images as one PNG grid here")
    p.set_defaults(func=run_shapes_eval)
    return p


def run_shapes_eval(args) -> int:
    import json

    from muse import Pipeline

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
    from PIL import Image

    n, _, H, W = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.ones(3, rows * (H + pad) + pad, columns * (W + pad) + pad)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = images[i]
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
