"""A judge for the shapes domain (`muse.shapes`): reads an image's attributes from its pixels alone.

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
     square's on it. The second test survives rounded corners (a small triangle through a VQ-GAN can fill so much
     of its box that fill alone would call it a circle);
  6. size from the larger extent, position from the box's centre on the 3x3 grid.

`judge(images)` returns one `Verdict` per image; `score(expected, verdict)` marks each stated attribute right or
wrong; `summarise` gathers the marks of many images (`muse.shapes.evaluate` generates and judges them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .domain import COLOUR_NAMES, IMAGE_SIZE, POSITION_NAMES, POSITIONS, SHAPES, SIZE_NAMES, SIZES, palette

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


def _nearest_colour(rgb: torch.Tensor) -> str:
    """rgb (3,) in [0, 1] -> the name of the nearest palette colour."""
    return COLOUR_NAMES[int((palette(rgb.device) - rgb).pow(2).sum(1).argmin())]


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
