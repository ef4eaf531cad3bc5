"""The shapes domain's language: one axis-aligned shape on a plain background, described by a caption.

Every image is described by a `Scenes` row: a shape (circle, square, triangle) of a named colour, a size (small,
medium, large), a position on a 3x3 grid (top left ... bottom right) with a little jitter, and a background of
another named colour. Its caption always names the shape, its colour and the background, and sometimes (each with
probability 1/2) the size and the position:

    "a red circle on a blue background"
    "a small red circle at the top left on a blue background"

Some (colour, shape, background) triples never appear in the training split (`HELDOUT`); the `heldout` split draws
only from them, so a model's prompt adherence can be measured on combinations it has never seen. Scenes are drawn
deterministically from a seed; `muse.shapes.render` draws them.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, fields

import torch

IMAGE_SIZE = 64

# Named colours, RGB in 0..255. Chosen far apart so a judge can name a colour from pixels alone.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 130, 20),
    "purple": (140, 50, 180),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
# half the side of the shape's bounding box, in pixels
SIZES: dict[str, float] = {"small": 6.0, "medium": 9.0, "large": 13.0}
SIZE_NAMES = tuple(SIZES)
# 3x3 grid of positions: name -> (row, column); centres at 16, 32, 48 pixels
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}  # fmt: skip
POSITION_NAMES = tuple(POSITIONS)
# the words a caption uses for each position
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}  # fmt: skip
GRID_CENTRES = (16.0, 32.0, 48.0)
JITTER = 2.0  # the shape's centre moves up to this many pixels from its grid centre, each axis


def _is_heldout(colour: int, background: int, shape: int) -> bool:
    """The rule that picks held-out triples: about one in eight (colour, background) pairs loses one shape, chosen so
    that every colour, shape and background, and every pair of them, still appears in training."""
    return (colour + 2 * background + 3 * shape) % 8 == 0


ALL_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(
    (c, b, s)
    for (ci, c), (bi, b), (si, s) in itertools.product(
        enumerate(COLOUR_NAMES), enumerate(COLOUR_NAMES), enumerate(SHAPES)
    )
    if c != b
)
HELDOUT: tuple[tuple[str, str, str], ...] = tuple(
    t for t in ALL_TRIPLES if _is_heldout(COLOUR_NAMES.index(t[0]), COLOUR_NAMES.index(t[1]), SHAPES.index(t[2]))
)
TRAIN_TRIPLES: tuple[tuple[str, str, str], ...] = tuple(t for t in ALL_TRIPLES if t not in set(HELDOUT))
SPLITS = {"train": TRAIN_TRIPLES, "heldout": HELDOUT}


def palette(device="cpu") -> torch.Tensor:
    """The named colours as a (num colours, 3) float tensor in [0, 1], in COLOUR_NAMES order."""
    return torch.tensor(list(COLOURS.values()), dtype=torch.float32, device=device) / 255.0


@dataclass
class Scenes:
    """A batch of scene descriptions, one row per image (all tensors of shape (N,), on the CPU)."""

    colour: torch.Tensor  # long, index into COLOUR_NAMES
    background: torch.Tensor  # long, index into COLOUR_NAMES, never equal to colour
    shape: torch.Tensor  # long, index into SHAPES
    size: torch.Tensor  # long, index into SIZE_NAMES
    position: torch.Tensor  # long, index into POSITION_NAMES
    cx: torch.Tensor  # float, centre in pixels (x to the right)
    cy: torch.Tensor  # float, centre in pixels (y downwards)
    mention_size: torch.Tensor  # bool, whether the caption names the size
    mention_position: torch.Tensor  # bool, whether the caption names the position

    def __len__(self) -> int:
        return len(self.colour)

    def __getitem__(self, index) -> "Scenes":
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def half(self) -> torch.Tensor:
        """Half side of each shape's bounding box, in pixels (N,)."""
        return torch.tensor(list(SIZES.values()))[self.size]

    def attributes(self, i: int) -> dict[str, str]:
        """The named attributes of scene i that its caption states (what a judge should check)."""
        out = {
            "background": COLOUR_NAMES[int(self.background[i])],
            "colour": COLOUR_NAMES[int(self.colour[i])],
            "shape": SHAPES[int(self.shape[i])],
        }
        if self.mention_size[i]:
            out["size"] = SIZE_NAMES[int(self.size[i])]
        if self.mention_position[i]:
            out["position"] = POSITION_NAMES[int(self.position[i])]
        return out


def sample_scenes(
    n: int,
    seed: int,
    split: str = "train",
    mention_prob: float = 0.5,
    balanced: bool = False,
    jitter: float = JITTER,
) -> Scenes:
    """Draw n scenes from a split ('train' or 'heldout'), deterministically from `seed`.

    Triples (colour, background, shape) are uniform over the split's triples (or, when `balanced`, taken in turn, so
    n = k * len(split) covers each triple k times); size, position and the centre's offset from its grid point
    (uniform in [-jitter, jitter] pixels per axis; 0 puts every shape exactly on the grid) are uniform; the caption
    mentions the size and the position each with probability `mention_prob`. The random draws are the same whatever
    `jitter` is, so two calls that differ only in it give the same scenes, moved."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= jitter <= JITTER:  # more would bring a large shape to the outer ring the judge reads
        raise ValueError(f"jitter must be in [0, {JITTER}] pixels, got {jitter}")
    g = torch.Generator().manual_seed(seed)
    triples = torch.tensor(
        [[COLOUR_NAMES.index(c), COLOUR_NAMES.index(b), SHAPES.index(s)] for c, b, s in SPLITS[split]]
    )
    which = torch.randint(len(triples), (n,), generator=g)
    pick = triples[torch.arange(n) % len(triples) if balanced else which]  # (n, 3)
    size = torch.randint(len(SIZES), (n,), generator=g)
    position = torch.randint(len(POSITIONS), (n,), generator=g)
    jitter = (torch.rand(n, 2, generator=g) * 2 - 1) * jitter
    mentions = torch.rand(n, 2, generator=g) < mention_prob
    rows_cols = torch.tensor(list(POSITIONS.values()))[position]  # (n, 2) as (row, col)
    centres = torch.tensor(GRID_CENTRES)
    return Scenes(
        colour=pick[:, 0],
        background=pick[:, 1],
        shape=pick[:, 2],
        size=size,
        position=position,
        cx=centres[rows_cols[:, 1]] + jitter[:, 0],
        cy=centres[rows_cols[:, 0]] + jitter[:, 1],
        mention_size=mentions[:, 0],
        mention_position=mentions[:, 1],
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(colour: str, shape: str, background: str, size: str | None = None, position: str | None = None) -> str:
    """'a [size] <colour> <shape> [position phrase] on a <background> background'."""
    if position is not None and position not in POSITION_PHRASES:
        raise ValueError(f"unknown position {position!r}; expected one of {list(POSITION_PHRASES)}")
    words = [w for w in (size, colour, shape) if w is not None]
    text = f"{_article(words[0])} {' '.join(words)}"
    if position is not None:
        text += " " + POSITION_PHRASES[position]
    return f"{text} on {_article(background)} {background} background"


def captions(scenes: Scenes) -> list[str]:
    """The caption of every scene."""
    out = []
    for i in range(len(scenes)):
        a = scenes.attributes(i)
        out.append(caption(a["colour"], a["shape"], a["background"], a.get("size"), a.get("position")))
    return out


@functools.cache
def _caption_table() -> dict[str, dict[str, str]]:
    """Every caption of the prompt language -> the attributes it states (8 x 7 x 3 triples, each with or without
    each of 3 sizes and 9 positions: 6720 captions)."""
    table = {}
    for colour, background, shape in ALL_TRIPLES:
        for size in (None, *SIZE_NAMES):
            for position in (None, *POSITION_NAMES):
                stated = {"background": background, "colour": colour, "shape": shape}
                if size is not None:
                    stated["size"] = size
                if position is not None:
                    stated["position"] = position
                table[caption(colour, shape, background, size, position)] = stated
    return table


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption of the prompt language states, as `Scenes.attributes` names them (the inverse of
    `caption`; case and repeated spaces are ignored). A text outside the language is a ValueError."""
    key = " ".join(text.lower().split())
    stated = _caption_table().get(key)
    if stated is None:
        raise ValueError(
            f"{text!r} is not a caption of the shapes language: expected e.g. "
            f"{caption('red', 'circle', 'blue')!r} or {caption('red', 'circle', 'blue', 'small', 'top left')!r} "
            f"(colours {', '.join(COLOUR_NAMES)}; shapes {', '.join(SHAPES)}; sizes {', '.join(SIZE_NAMES)}; "
            "the shape's colour not the background's)"
        )
    return dict(stated)
