"""Images in and out of the pipeline: PIL / numpy / torch conversions, input checks, masks, grids.

Pixels are floats in [0, 1] everywhere (no [-1, 1] normalisation, as aMUSEd). Conversions follow the reference's
image processor: PIL -> uint8 array / 255 as fp32; out, round(x * 255) to uint8. Masks: white (>= 0.5) = repaint.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image]

MASK_MODES = ("L", "1", "RGB")  # PIL modes a mask may have (RGB is converted to luminance, as the reference)


# --- out -----------------------------------------------------------------------------------------------------------


class ImageList(list):
    """The PIL images of a call: a plain list, which also answers `.images` (itself) so that code written for
    diffusers' pipeline output (`pipe(prompt).images[0]`) runs unchanged."""

    @property
    def images(self) -> "ImageList":
        return self


class ImageArray(np.ndarray):
    """The float array (B, H, W, 3) of a call with output_type="np", which also answers `.images` (itself), as
    diffusers' pipeline output does."""

    @property
    def images(self) -> "ImageArray":
        return self


def to_numpy(pixels: torch.Tensor) -> np.ndarray:
    """pixels (B, 3, H, W) in [0, 1] -> float32 array (B, H, W, 3)."""
    return pixels.detach().cpu().permute(0, 2, 3, 1).float().numpy()


def to_pil(images: np.ndarray) -> ImageList:
    """float array (B, H, W, 3) in [0, 1] -> RGB PIL images, round(x * 255)."""
    if images.ndim == 3:
        images = images[None]
    return ImageList(PIL.Image.fromarray(im) for im in (np.asarray(images) * 255).round().astype("uint8"))


def make_grid(images: Sequence[PIL.Image.Image], cols: int | None = None) -> PIL.Image.Image:
    """Tile equally sized images row by row, `cols` per row (default: as square as possible)."""
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise ValueError("grid images must all have the same size")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = PIL.Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# --- in ------------------------------------------------------------------------------------------------------------


def load_image(path: str | Path, mode: str | None = "RGB") -> PIL.Image.Image:
    """Open an image file, converted to `mode` (None: as stored). A file PIL cannot decode (not an image, truncated,
    corrupt) or one whose pixel count exceeds PIL's decompression-bomb limit raises a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)  # a bomb is refused, not just noted
            with PIL.Image.open(path) as im:
                im.load()
                return im.convert(mode) if mode else im.copy()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
        raise ValueError(f"{path}: refused to decode: {e}") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
    ) as e:  # PIL's ways of saying unreadable (UnidentifiedImageError is an OSError)
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def _as_list(image) -> list:
    return list(image) if isinstance(image, (list, tuple)) else [image]


def image_to_tensor(image: ImageInput, multiple_of: int) -> torch.Tensor:
    """An RGB image or batch of them -> pixels (B, 3, H, W) float32 in [0, 1], checked.

    Accepts PIL images (mode RGB; a list for a batch, all the same size), arrays (H, W, 3) or (B, H, W, 3) and
    tensors (3, H, W) or (B, 3, H, W), of floats in [0, 1] or uint8 in [0, 255]. H and W must be multiples of
    `multiple_of` (the VQ-GAN's downsampling factor): this function never resizes silently."""
    items = _as_list(image)
    if not items:
        raise ValueError("image is an empty list")
    if isinstance(items[0], PIL.Image.Image):
        for im in items:
            if not isinstance(im, PIL.Image.Image):
                raise TypeError("a list of images must hold only PIL images")
            if im.mode != "RGB":
                raise ValueError(f"image mode is {im.mode!r}; an RGB image is needed (use image.convert('RGB'))")
        if len({im.size for im in items}) > 1:
            raise ValueError(f"images of a batch must have one size, got {sorted({im.size for im in items})}")
        pixels = torch.from_numpy(np.stack([np.array(im).astype(np.float32) / 255.0 for im in items])).permute(
            0, 3, 1, 2
        )
    elif len(items) == 1 and isinstance(items[0], np.ndarray):
        arr = items[0]
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"an image array must be (H, W, 3) or (B, H, W, 3), got shape {items[0].shape}")
        pixels = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    elif len(items) == 1 and isinstance(items[0], torch.Tensor):
        pixels = items[0]
        if pixels.dim() == 3:
            pixels = pixels[None]
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"an image tensor must be (3, H, W) or (B, 3, H, W), got shape {tuple(items[0].shape)}")
    else:
        raise TypeError(
            f"image must be a PIL image, a list of them, a numpy array or a tensor; got {type(image).__name__}"
        )
    pixels = unit_range(pixels, "image")
    H, W = pixels.shape[-2:]
    if H % multiple_of or W % multiple_of:
        raise ValueError(
            f"image size {W}x{H} (width x height) is not a multiple of {multiple_of}, the VQ-GAN's downsampling factor; "
            "resize or crop it first"
        )
    return pixels.float()


def unit_range(values: torch.Tensor, what: str) -> torch.Tensor:
    """Array or tensor values -> float32 in [0, 1]: uint8 is read as 0-255 (divided by 255); floats must already lie
    in [0, 1] (0-255 floats, negative values or NaN are refused, never clipped into garbage)."""
    if values.dtype == torch.uint8:
        return values.float() / 255.0
    if not values.is_floating_point():
        raise ValueError(
            f"{what} arrays and tensors must be floats in [0, 1] or uint8 in [0, 255], got dtype {values.dtype}"
        )
    values = values.float()
    if values.numel() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what} values must be floats in [0, 1]; this one holds NaN or infinite values")
    if values.numel() and (values.min() < 0 or values.max() > 1):
        low, high = float(values.min()), float(values.max())
        hint = " (0-255 values? divide by 255, or pass uint8)" if high > 1 and high <= 255 and low >= 0 else ""
        raise ValueError(f"{what} values must be floats in [0, 1], got values in [{low:g}, {high:g}]{hint}")
    return values


def mask_to_tensor(mask: ImageInput, size: tuple[int, int], grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask (white = repaint) for images of `size` (H, W) -> (token mask (B, h, w) bool, pixel mask (B, 1, H, W) bool).

    The token mask is computed as the reference does: the mask is resized straight to the token grid (PIL Lanczos,
    then converted to luminance; arrays and tensors with nearest interpolation) and binarised at 0.5. The pixel mask
    is the mask at full size binarised at 0.5 (used to paste original pixels back).
    PIL masks may be of mode L, 1 or RGB; arrays (H, W), (H, W, 1), (B, H, W) or (B, H, W, 1) and tensors (H, W),
    (1, H, W), (B, H, W) or (B, 1, H, W), of floats in [0, 1], uint8 in [0, 255] or bools. The mask must have the
    image's size."""
    H, W = size
    h, w = grid
    items = _as_list(mask)
    if not items:
        raise ValueError("mask_image is an empty list")
    if isinstance(items[0], PIL.Image.Image):
        for m in items:
            if not isinstance(m, PIL.Image.Image):
                raise TypeError("a list of masks must hold only PIL images")
            if m.mode not in MASK_MODES:
                raise ValueError(f"mask mode is {m.mode!r}; a mask must be a PIL image of mode {', '.join(MASK_MODES)}")
            if m.size != (W, H):
                raise ValueError(f"mask size {m.size[0]}x{m.size[1]} differs from the image size {W}x{H}")
        small = [np.array(m.resize((w, h), resample=PIL.Image.Resampling.LANCZOS).convert("L")) for m in items]
        full = [np.array(m.convert("L")) for m in items]
        tokens = torch.from_numpy(np.stack(small).astype(np.float32) / 255.0)[:, None]  # (B, 1, h, w)
        pixels = torch.from_numpy(np.stack(full).astype(np.float32) / 255.0)[:, None]  # (B, 1, H, W)
    elif len(items) == 1 and isinstance(items[0], (np.ndarray, torch.Tensor)):
        m = items[0]
        pixels = torch.from_numpy(np.ascontiguousarray(m)) if isinstance(m, np.ndarray) else m.detach().cpu()
        if isinstance(m, np.ndarray) and pixels.dim() >= 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]  # (..., H, W, 1) -> (..., H, W)
        if pixels.dim() == 4 and pixels.shape[1] == 1:
            pixels = pixels[:, 0]
        if pixels.dim() == 2:
            pixels = pixels[None]
        if pixels.dim() != 3:
            raise ValueError(f"a mask array or tensor must hold one channel, got shape {tuple(m.shape)}")
        pixels = unit_range(pixels.float() if pixels.dtype == torch.bool else pixels, "mask")
        if tuple(pixels.shape[-2:]) != (H, W):
            raise ValueError(f"mask size {pixels.shape[-1]}x{pixels.shape[-2]} differs from the image size {W}x{H}")
        pixels = pixels[:, None]  # (B, 1, H, W)
        tokens = F.interpolate(pixels, size=(h, w))  # nearest, as the reference
    else:
        raise TypeError(
            f"mask_image must be a PIL image, a list of them, a numpy array or a tensor; got {type(mask).__name__}"
        )
    return (tokens[:, 0] >= 0.5), (pixels >= 0.5)
