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
  6. size from the larger extent, position from the box's centre on the 3x3 grid;
  7. the outline: the intersection over union of the shape's coverage with the ideal shape of its class (an ellipse
     inscribed in the box, the box itself, or the upward triangle with its apex at the top centre and its base on the
     bottom edge) drawn with 4x4 supersampling in the shape's own box, the one whose ideal shape has the coverage's
     centroid and second moments (`moment_boxes`). Soft IoU: sum(min) / sum(max). A drawn shape counts as right
     only when its class is right, its outline IoU is at least OUTLINE_IOU_MIN and there is no stray second blob
     (another region of alpha > 0.5 of at least STRAY_MIN_PIXELS pixels). Wobbly squares, rounded triangles and torn
     shapes fail here even when their fill and centroid give the right class.

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
# outline: a shape is drawn right when its IoU with the ideal shape of its class in its own box is at least this.
# Rendered ground truth scores well above it, small shapes lowest (measured in docs/default_model.md)
OUTLINE_IOU_MIN = 0.8
STRAY_MIN_PIXELS = 6  # a second region of alpha > 1/2 this large is a stray blob (an error); smaller specks are ignored
OUTLINE_SUPERSAMPLE = 4


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
    outline_iou: float = 0.0  # IoU of the shape with the ideal shape of its judged class in its own box (0: no shape)
    stray_pixels: int = 0  # pixels of the second-largest region of alpha > 1/2 (0: none)

    @property
    def outline_ok(self) -> bool:
        """The shape is drawn cleanly: outline IoU >= OUTLINE_IOU_MIN and no stray blob."""
        return self.shape is not None and self.outline_iou >= OUTLINE_IOU_MIN and self.stray_pixels < STRAY_MIN_PIXELS

    def as_dict(self) -> dict:
        return asdict(self)


def _nearest_colour(rgb: torch.Tensor) -> str:
    """rgb (3,) in [0, 1] -> the name of the nearest palette colour."""
    return COLOUR_NAMES[int((palette(rgb.device) - rgb).pow(2).sum(1).argmin())]


def _regions(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """mask (H, W) bool -> (the largest 8-connected region of it (H, W) bool, the pixel count of the second largest
    region, 0 if none) by label propagation through max-pooling."""
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
    top = counts.topk(2)
    return (labels.view(H, W).long() == int(top.indices[0])) & mask, int(top.values[1])


# second moments of the ideal shapes in a box of width w, height h: var_x = w^2 / K_X, var_y = h^2 / K_Y; and the
# centroid's depth below the box's top, in box heights (SHAPES order: circle, square, triangle)
_K_X = {"circle": 16.0, "square": 12.0, "triangle": 24.0}
_K_Y = {"circle": 16.0, "square": 12.0, "triangle": 18.0}
_CENTROID_DEPTH = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3}


def moment_boxes(cover: torch.Tensor) -> dict[str, tuple[float, float, float, float]]:
    """For each shape class, the box (x0, y0, w, h) whose ideal shape has the centroid and the second moments of the
    coverage `cover` (H, W): exact for a rendered shape (up to supersampling), unlike the extents of its pixels, which
    anti-aliasing shortens by up to a pixel at a triangle's apex and base corners. Pixel masses sit at pixel centres,
    so each variance gets the within-pixel 1/12 (Sheppard's correction)."""
    H, W = cover.shape
    area = cover.sum().clamp(min=1e-6)
    ys, xs = torch.arange(H, dtype=torch.float32) + 0.5, torch.arange(W, dtype=torch.float32) + 0.5
    px, py = cover.sum(0), cover.sum(1)  # column and row masses
    mx, my = float((px * xs).sum() / area), float((py * ys).sum() / area)
    vx = float((px * (xs - mx).pow(2)).sum() / area) + 1 / 12
    vy = float((py * (ys - my).pow(2)).sum() / area) + 1 / 12
    boxes = {}
    for k in SHAPES:
        w, h = math.sqrt(_K_X[k] * vx), math.sqrt(_K_Y[k] * vy)
        boxes[k] = (mx - w / 2, my - _CENTROID_DEPTH[k] * h, w, h)
    return boxes


def ideal_coverage(
    shape: str, box: tuple[float, float, float, float], H: int, W: int, s: int = OUTLINE_SUPERSAMPLE
) -> torch.Tensor:
    """The ideal `shape` in the continuous box (x0, y0, w, h): the ellipse inscribed in it, the box itself, or the
    upward triangle with its apex at the top centre and its base on the bottom edge; per-pixel coverage (H, W) with
    s x s supersampling."""
    x0, y0, w, h = box
    v = (((torch.arange(H * s, dtype=torch.float32) + 0.5) / s - y0) / max(h, 1e-6)).view(-1, 1)  # 0 top .. 1 bottom
    u = (((torch.arange(W * s, dtype=torch.float32) + 0.5) / s - x0) / max(w, 1e-6)).view(1, -1)  # 0 left .. 1 right
    if shape == "circle":
        inside = (2 * u - 1).pow(2) + (2 * v - 1).pow(2) <= 1
    else:
        inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
        if shape == "triangle":
            inside = inside & ((2 * u - 1).abs() <= v)
    return F.avg_pool2d(inside.float().view(1, 1, H * s, W * s), s).view(H, W)


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Soft intersection over union of coverages (..., H, W) in [0, 1]: sum(min) / sum(max) over the last two dims."""
    return torch.minimum(a, b).sum((-2, -1)) / torch.maximum(a, b).sum((-2, -1)).clamp(min=1e-6)


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
    region, stray = _regions(alpha > 0.5)
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
    shape = _classify_shape(fill, drop)
    ideal = ideal_coverage(shape, moment_boxes(cover)[shape], H, W)
    return Verdict(
        background=background,
        colour=_nearest_colour(fg),
        shape=shape,
        size=_classify_size(max(w, h) / 2 * IMAGE_SIZE / max(H, W)),
        position=_classify_position(cx, cy, W, H),
        fill=fill,
        drop=drop,
        bbox=(x0, y0, x1, y1),
        outline_iou=float(soft_iou(cover, ideal)),
        stray_pixels=stray,
    )


def judge(images: torch.Tensor) -> list[Verdict]:
    """images (B, 3, H, W) float in [0, 1] -> one Verdict per image."""
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return [judge_one(im) for im in images]


def score(expected: dict[str, str], verdict: Verdict, outline: bool = True) -> dict[str, bool]:
    """Mark each stated attribute (keys among background, colour, shape, size, position) right or wrong. The shape is
    right when its class is and, with `outline` (the default), its outline is clean too (`Verdict.outline_ok`)."""
    unknown = set(expected) - {"background", "colour", "shape", "size", "position"}
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}")
    marks = {k: getattr(verdict, k) == v for k, v in expected.items()}
    if outline and "shape" in marks:
        marks["shape"] = marks["shape"] and verdict.outline_ok
    return marks


@dataclass
class AdherenceReport:
    """Prompt adherence: the fraction of stated attributes the judge found right, overall and per attribute."""

    accuracy: float  # right / stated, over all attributes of all images
    per_attribute: dict[str, float]
    all_right: float  # fraction of images with every stated attribute right
    num_images: int
    num_attributes: int
    shape_class: float | None = None  # fraction of images whose shape class alone is right (no outline test)
    outline_iou: float | None = None  # mean outline IoU over the images whose shape class is right
    outline_iou_by_shape: dict[str, float] | None = None  # the same per expected shape

    def format(self) -> str:
        parts = ", ".join(f"{k} {v:.1%}" for k, v in sorted(self.per_attribute.items()))
        text = (
            f"adherence {self.accuracy:.1%} of {self.num_attributes} attributes over {self.num_images} images "
            f"({parts}); images entirely right {self.all_right:.1%}"
        )
        if self.shape_class is not None:
            by = ", ".join(f"{k} {v:.3f}" for k, v in sorted((self.outline_iou_by_shape or {}).items()))
            text += f"; shape class alone {self.shape_class:.1%}, outline IoU {self.outline_iou:.3f} ({by})"
        return text


def summarise(
    marks: list[dict[str, bool]], expected: list[dict[str, str]] | None = None, verdicts: list[Verdict] | None = None
) -> AdherenceReport:
    """Per-image marks (from `score`) -> AdherenceReport; with the expected attributes and the verdicts, also the
    shape-class-only accuracy and the mean outline IoU (over the images whose class is right, overall and per shape)."""
    if not marks:
        raise ValueError("no images to summarise")
    per: dict[str, list[bool]] = {}
    for m in marks:
        for k, ok in m.items():
            per.setdefault(k, []).append(ok)
    total = sum(len(v) for v in per.values())
    extra = {}
    if expected is not None and verdicts is not None:
        right = [(e["shape"], v.outline_iou) for e, v in zip(expected, verdicts) if v.shape == e["shape"]]
        ious: dict[str, list[float]] = {}
        for k, iou in right:
            ious.setdefault(k, []).append(iou)
        extra = dict(
            shape_class=len(right) / len(expected),
            outline_iou=sum(i for _, i in right) / max(len(right), 1),
            outline_iou_by_shape={k: sum(v) / len(v) for k, v in ious.items()},
        )
    return AdherenceReport(
        accuracy=sum(sum(v) for v in per.values()) / total,
        per_attribute={k: sum(v) / len(v) for k, v in per.items()},
        all_right=sum(all(m.values()) for m in marks) / len(marks),
        num_images=len(marks),
        num_attributes=total,
        **extra,
    )


CHANCE = {
    "background": 1 / len(COLOUR_NAMES),
    "colour": 1 / len(COLOUR_NAMES),
    "shape": 1 / len(SHAPES),
    "size": 1 / len(SIZE_NAMES),
    "position": 1 / len(POSITION_NAMES),
}  # what a judge scores on images that ignore the prompt, for uniform attributes
