"""Drawing scenes of the shapes domain: anti-aliased (4x4 supersampling per pixel) and vectorised, so `render(scenes)`
draws a whole batch at once, on any device; plus a map-style dataset and an endless stream of batches."""

from __future__ import annotations

import itertools

import torch

from .domain import IMAGE_SIZE, SHAPES, Scenes, captions, palette, sample_scenes

SUPERSAMPLE = 4  # subsamples per pixel side for anti-aliasing


def _inside(shape: str, dx: torch.Tensor, dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Whether each subsample at offset (dx, dy) from the centre lies inside the shape of half side h."""
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (dx.abs() <= h) & (dy.abs() <= h)
    # triangle: apex at (cx, cy - h), base from (cx - h, cy + h) to (cx + h, cy + h)
    return (dy <= h) & (2 * dx.abs() <= dy + h)


def coverage(scenes: Scenes, device="cpu", size: int = IMAGE_SIZE) -> torch.Tensor:
    """The fraction of each pixel that the shape covers, (N, size, size) in [0, 1] (4x4 supersampling)."""
    n, s = len(scenes), SUPERSAMPLE
    t = (torch.arange(size * s, device=device, dtype=torch.float32) + 0.5) / s  # subsample centres, pixel units
    y, x = t.view(1, -1, 1), t.view(1, 1, -1)
    cx, cy = scenes.cx.to(device).view(n, 1, 1).float(), scenes.cy.to(device).view(n, 1, 1).float()
    h = scenes.half.to(device).view(n, 1, 1)
    dx, dy = x - cx, y - cy  # (N, S*size, S*size) by broadcasting
    kind = scenes.shape.to(device)
    inside = torch.empty(n, size * s, size * s, device=device)
    for k, shape in enumerate(SHAPES):  # each image evaluates only its own shape's test
        sel = (kind == k).nonzero().squeeze(1)
        if len(sel):
            inside[sel] = _inside(shape, dx[sel], dy[sel], h[sel]).float()
    return torch.nn.functional.avg_pool2d(inside.unsqueeze(1), s).squeeze(1)  # (N, size, size)


def render(scenes: Scenes, device="cpu", chunk: int = 512) -> torch.Tensor:
    """Draw the scenes: (N, 3, 64, 64) float32 in [0, 1] on `device`."""
    pal = palette(device)
    out = []
    for start in range(0, len(scenes), chunk):
        part = scenes[start : start + chunk]
        alpha = coverage(part, device).unsqueeze(1)  # (n, 1, H, W)
        fg = pal[part.colour.to(device)].view(-1, 3, 1, 1)
        bg = pal[part.background.to(device)].view(-1, 3, 1, 1)
        out.append(bg + alpha * (fg - bg))
    if not out:
        return torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    return torch.cat(out)


class ShapesDataset(torch.utils.data.Dataset):
    """A map-style dataset of `length` rendered scenes, deterministic from `seed`: item i is
    {"image": (3, 64, 64) float in [0, 1], "caption": str, "attributes": dict}."""

    def __init__(self, length: int, seed: int = 0, split: str = "train"):
        self.scenes = sample_scenes(length, seed, split)
        self.captions = captions(self.scenes)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} scenes")
        i = i % len(self)
        return {
            "image": render(self.scenes[i : i + 1])[0],
            "caption": self.captions[i],
            "attributes": self.scenes.attributes(i),
        }


def stream(batch_size: int, seed: int, split: str = "train", device="cpu", with_captions: bool = True):
    """An endless, deterministic iterator of (images (B, 3, 64, 64) on `device`, captions or None) batches; batch k is
    drawn from seed (seed, k), so a run restarted from batch k sees the same data."""
    for k in itertools.count():
        scenes = sample_scenes(batch_size, seed * 1_000_003 + k, split)
        yield render(scenes, device), (captions(scenes) if with_captions else None)
