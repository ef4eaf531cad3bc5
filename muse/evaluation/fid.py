"""FID with torch-fidelity's Inception-v3 feature extractor.

What the number is, precisely (also written into every results file):
  - features: torch-fidelity's `FeatureExtractorInceptionV3`, the TensorFlow Inception graph of 2015-12-05 (the one of
    the original TTUR FID code) ported to PyTorch, 2048-d pool3 features;
  - resizing: inside the extractor, uint8 images are resized to 299x299 with TensorFlow-1.x-compatible bilinear
    interpolation (align_corners=False), as the original TensorFlow FID does. This is not clean-fid's default "clean"
    mode (PIL bicubic resize), which the published aMUSEd / open-muse COCO numbers (FID ~39) used, so numbers from
    here are comparable with TensorFlow-FID / torch-fidelity numbers, not digit for digit with clean-fid's;
  - reference images: centre-cropped to the generated images' aspect ratio and resized to their resolution with PIL
    bicubic (then uint8), so both sets enter the extractor at the same size;
  - distance: the Frechet distance of Gaussians fitted to the two feature sets, the formula of torch-fidelity /
    TTUR / clean-fid, computed exactly through symmetric eigenproblems (see `frechet_distance`; tested equal to
    torch_fidelity.metric_fid).
FID is biased upwards for small sets (papers use 10k-30k images); compare numbers computed on the same sizes only.

Weights: `weights-inception-2015-12-05-6726825d.pth`, given as a path, or found in torch's hub cache
(`<torch hub dir>/checkpoints/`), or downloaded there from torch-fidelity's release when the machine has network.
torch-fidelity loads the file with a full unpickler, so it is first checked with torch.load(weights_only=True):
a file that loads that way holds only tensors and containers, never code.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .errors import MissingWeightsError

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
FEATURE_LAYER = "2048"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def default_weights_path() -> Path:
    """Where torch-fidelity itself caches the weights it downloads."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _missing(reason: str) -> MissingWeightsError:
    return MissingWeightsError(
        f"FID needs the Inception weights file {INCEPTION_WEIGHTS_FILE} (torch-fidelity's port of the TensorFlow "
        f"FID Inception): {reason}. Download it from {INCEPTION_WEIGHTS_URL} on a machine with network and pass "
        f"--fid-weights PATH, or put it at {default_weights_path()}."
    )


def resolve_inception_weights(path: str | Path | None = None, offline: bool = False) -> Path:
    """The weights file to use: `path`, else the hub cache, else a download (unless offline)."""
    if path is not None:
        if not Path(path).is_file():
            raise _missing(f"{path} is not a file")
        return Path(path)
    cached = default_weights_path()
    if cached.is_file():
        return cached
    if offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise _missing("no --fid-weights given, none in the cache, and this run is offline")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(cached), progress=True)
    except Exception as e:  # no network
        raise _missing(f"no --fid-weights given, none in the cache, and the download failed ({e})") from e
    return cached


def check_plain_state_dict(path: Path) -> None:
    """Refuse a file that holds anything but tensors (it would be unpickled by torch-fidelity)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path} is not a plain PyTorch state dict (torch.load(weights_only=True) refused it: {e})"
        ) from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a state dict of tensors")


def images_to_uint8(images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) uint8."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of one batch must share a size, got {sorted(sizes)}")
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).contiguous()


def fit_to_size(image: PIL.Image.Image, size: tuple[int, int]) -> PIL.Image.Image:
    """Centre-crop `image` to the aspect ratio of `size` (W, H), then resize it to `size` with PIL bicubic."""
    w, h = image.size
    tw, th = size
    if w * th > h * tw:  # too wide: crop the sides
        cw, ch = round(h * tw / th), h
    else:
        cw, ch = w, round(w * th / tw)
    left, top = (w - cw) // 2, (h - ch) // 2
    image = image.convert("RGB").crop((left, top, left + cw, top + ch))
    return image if image.size == size else image.resize(size, PIL.Image.BICUBIC)


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"FID reference folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"FID reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def feature_statistics(features: torch.Tensor) -> dict:
    """(N, D) features -> {"mu": (D,), "sigma": (D, D) (unbiased covariance, as np.cov), "n": N} in float64; with
    N <= D also "centered": the (N, D) centred features, which make the distance exact and fast (below)."""
    x = features.detach().cpu().double().numpy()
    n, d = x.shape
    if n < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n}")
    mu = x.mean(axis=0)
    centered = x - mu
    stats = {"mu": mu, "sigma": centered.T @ centered / (n - 1), "n": n}
    if n <= d:
        stats["centered"] = centered
    return stats


def frechet_distance(a: dict, b: dict) -> float:
    """The Frechet distance of the Gaussians (mu_a, S_a), (mu_b, S_b):

        |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr sqrt(S_a S_b)

    the formula of the TTUR / torch-fidelity / clean-fid code. They get tr sqrt(S_a S_b) from the eigenvalues of the
    non-symmetric D x D product (minutes on a CPU for D = 2048); here it comes from symmetric eigenvalue problems
    with the same eigenvalues, which is exact and faster:
      - a set of N <= D images (centred features X, S_a = X^T X / (N - 1)): the nonzero eigenvalues of S_a S_b are
        those of the N x N matrix X S_b X^T / (N - 1);
      - otherwise: those of S_a^(1/2) S_b S_a^(1/2).
    tests/test_evaluate.py checks the result against torch_fidelity.metric_fid on the same statistics."""
    if "centered" not in a and "centered" in b:
        a, b = b, a
    diff = a["mu"] - b["mu"]
    if "centered" in a:
        x = a["centered"]
        inner = x @ b["sigma"] @ x.T / (a["n"] - 1)  # (N, N), symmetric PSD
    else:
        w, v = np.linalg.eigh(a["sigma"])
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_a^(1/2)
        inner = root @ b["sigma"] @ root  # (D, D), symmetric PSD
    inner = (inner + inner.T) / 2  # exact symmetry for eigvalsh
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum()
    return float(diff @ diff + np.trace(a["sigma"]) + np.trace(b["sigma"]) - 2 * tr_sqrt)


class InceptionFID:
    """Inception features and FID statistics of image sets."""

    def __init__(
        self,
        weights: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        offline: bool = False,
    ):
        # heavy and used only for FID: imported when the first features are computed
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.weights = resolve_inception_weights(weights, offline)
        check_plain_state_dict(self.weights)
        self.device, self.batch_size = torch.device(device), batch_size
        try:
            self.extractor = FeatureExtractorInceptionV3(
                "inception-v3-compat", [FEATURE_LAYER], feature_extractor_weights_path=str(self.weights)
            )
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, shape mismatch
            raise ValueError(f"{self.weights} does not hold torch-fidelity's Inception-v3 weights: {e}") from e
        self.extractor.to(self.device)

    @torch.no_grad()
    def features(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        """(N, 2048) float32 pool3 features of PIL images (of one size per batch)."""
        out = [
            self.extractor(images_to_uint8(images[i : i + self.batch_size]).to(self.device))[0].cpu()
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(out)

    def features_of_files(
        self, paths: Sequence[Path], size: tuple[int, int] | None = None, progress: bool = False
    ) -> torch.Tensor:
        """Features of image files, read `batch_size` at a time; fitted to `size` (W, H) first when given."""
        out = []
        for i in tqdm(range(0, len(paths), self.batch_size), desc="inception features", disable=not progress):
            images = []
            for p in paths[i : i + self.batch_size]:
                with PIL.Image.open(p) as im:
                    images.append(fit_to_size(im, size) if size else im.convert("RGB"))
            out.append(self.features(images))
        return torch.cat(out)

    def reference_id(self, folder: str | Path, size: tuple[int, int]) -> str:
        """Identifies the reference statistics: the folder's file list (names, byte sizes, modification times), the
        size the images are fitted to, and the weights."""
        files = list_images(folder)
        ident = {
            "files": [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
            "size": list(size),
            "weights": self.fingerprint(),
        }
        return hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:12]

    def reference_statistics(
        self, folder: str | Path, size: tuple[int, int], cache_dir: Path | None = None
    ) -> tuple[dict, int]:
        """(statistics, number of images) of a reference folder fitted to `size` (W, H); cached in `cache_dir` as
        fid_reference_<reference_id>.npz."""
        files = list_images(folder)
        cache = (
            Path(cache_dir) / f"fid_reference_{self.reference_id(folder, size)}.npz" if cache_dir is not None else None
        )
        if cache is not None and cache.is_file():
            with np.load(cache) as z:
                return {k: (int(z[k]) if k == "n" else z[k]) for k in z.files}, len(files)
        stats = feature_statistics(self.features_of_files(files, size, progress=True))
        if cache is not None:
            np.savez(cache, **stats)
        return stats, len(files)

    def fingerprint(self) -> str:
        """Changes when the implementation or the weights file does."""
        st = self.weights.stat()
        return json.dumps([self.describe()["implementation"], str(self.weights), st.st_size, st.st_mtime_ns])

    def describe(self) -> dict:
        return {
            "implementation": f"torch-fidelity {version('torch-fidelity')} FeatureExtractorInceptionV3 "
            f"(TensorFlow FID Inception 2015-12-05 ported to PyTorch), pool3 {FEATURE_LAYER}-d features",
            "resizing": "inside the extractor to 299x299, TensorFlow-1.x-compatible bilinear (align_corners=False), "
            "as the original TensorFlow FID; not clean-fid's 'clean' (PIL bicubic) mode",
            "reference_preprocessing": "centre crop to the generated aspect ratio, PIL bicubic resize to the generated resolution, uint8",
            "distance": "Frechet distance of Gaussians fitted to the features (TTUR / torch-fidelity formula, exact symmetric eigensolver)",
            "weights": str(self.weights),
        }
