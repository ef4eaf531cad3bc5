"""CLIP score with open_clip_torch, as the text-to-image papers compute it.

For an image x and its prompt c, with E_I / E_T the CLIP image / text towers (projected embeddings):

    CLIPScore(x, c) = 100 * max(cos(E_I(x), E_T(c)), 0)

averaged over the images of a setting. This is the definition of torchmetrics' `CLIPScore` (used by the aMUSEd /
open-muse evaluations, CLIP ViT-L/14 'openai' there); Hessel et al. (2021) scale by 2.5 instead of 100, which papers
reporting "CLIP score ~ 26-32" do not. Images are preprocessed with the CLIP model's own evaluation transform (resize
the shorter side to the model's input size, bicubic, centre crop, normalise); prompts with the model's tokenizer.

Weights: a local checkpoint file (`.safetensors`, `.bin`, `.pt`; loaded with weights_only=True) or one of open_clip's
pretrained tags for the model, downloaded when the machine has network. Random weights are never used silently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import PIL.Image
import torch

from .errors import MissingWeightsError

HF_HUB_PREFIX = "hf-hub:"


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(N, D), (N, D) -> (N,) 100 * max(cosine, 0) of each row pair (the embeddings need not be normalised)."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return 100.0 * cos.clamp(min=0)


def _no_weights_message(model_name: str, weights: str | None, reason: str) -> str:
    import open_clip  # heavy (it imports torchvision): only when a CLIP score is asked for

    lines = [f"CLIP score needs weights for the open_clip model {model_name!r}: {reason}."]
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if weights and weights in tags:
        cfg = open_clip.get_pretrained_cfg(model_name, weights)
        where = (
            [f"the Hugging Face repo {cfg['hf_hub'].rstrip('/')} (file open_clip_pytorch_model.bin)"]
            if cfg.get("hf_hub")
            else []
        )
        where += [cfg["url"]] if cfg.get("url") else []
        lines.append(f"Supply the file of tag {weights!r} (from {' or '.join(where)}) with --clip-weights PATH.")
    else:
        lines.append("Supply a local open_clip checkpoint file for this model with --clip-weights PATH")
        if tags:
            lines.append(f"(or, on a machine with network, one of its pretrained tags: {', '.join(tags)}).")
    return " ".join(lines)


def load_clip(model_name: str, weights: str | None, device: str | torch.device = "cpu", offline: bool = False):
    """-> (model in eval mode, preprocess transform, tokenizer). Raises MissingWeightsError naming the file to supply
    when `weights` is missing, or a pretrained tag that cannot be downloaded (`offline`, or no network)."""
    import open_clip  # heavy (it imports torchvision): only when a CLIP score is asked for

    offline = offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    kwargs = dict(device=device, require_pretrained=True)
    if model_name.startswith(HF_HUB_PREFIX):
        if offline:
            raise MissingWeightsError(
                f"CLIP model {model_name!r} is on the Hugging Face hub and this run is offline; "
                "pass a built-in model name with --clip-weights PATH instead"
            )
        source = dict(model_name=model_name)
    elif weights is None:
        raise MissingWeightsError(_no_weights_message(model_name, None, "no --clip-weights given"))
    elif Path(weights).is_file():
        source = dict(model_name=model_name, pretrained=str(weights))
    elif weights in open_clip.list_pretrained_tags_by_model(model_name):
        if offline:
            raise MissingWeightsError(_no_weights_message(model_name, weights, "this run is offline"))
        source = dict(model_name=model_name, pretrained=weights)
    else:
        raise MissingWeightsError(
            _no_weights_message(model_name, weights, f"{weights!r} is neither a file nor a pretrained tag")
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(**source, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    except RuntimeError as e:
        if any(word in str(e).lower() for word in ("download", "connection", "could not be loaded")):
            raise MissingWeightsError(_no_weights_message(model_name, weights, f"the download failed ({e})")) from e
        raise
    return model.eval(), preprocess, tokenizer


class ClipScorer:
    """Scores (image, prompt) pairs with one CLIP model."""

    def __init__(
        self,
        model_name: str,
        weights: str | None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        offline: bool = False,
    ):
        self.model_name, self.weights = model_name, weights
        self.device, self.batch_size = torch.device(device), batch_size
        self.model, self.preprocess, self.tokenizer = load_clip(model_name, weights, self.device, offline)

    @torch.no_grad()
    def scores(self, images: Sequence[PIL.Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) CLIP score of image i with prompt i."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), self.batch_size):
            ims = images[start : start + self.batch_size]
            pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in ims]).to(self.device)  # (B, 3, S, S)
            tokens = self.tokenizer(list(prompts[start : start + self.batch_size])).to(self.device)  # (B, L)
            out.append(
                clip_score_from_embeddings(self.model.encode_image(pixels), self.model.encode_text(tokens)).cpu()
            )
        return torch.cat(out)

    def scores_of_files(self, paths: Sequence[Path], prompts: Sequence[str]) -> torch.Tensor:
        """(N,) CLIP score of image file i with prompt i, reading `batch_size` files at a time."""
        out = []
        for start in range(0, len(paths), self.batch_size):
            images = []
            for p in paths[start : start + self.batch_size]:
                with PIL.Image.open(p) as im:
                    images.append(im.convert("RGB"))
            out.append(self.scores(images, prompts[start : start + self.batch_size]))
        return torch.cat(out)

    def fingerprint(self) -> str:
        """Changes when the model, the library or the weights (file) do."""
        w = Path(self.weights) if self.weights else None
        stat = [w.stat().st_size, w.stat().st_mtime_ns] if w and w.is_file() else None
        return json.dumps([self.describe(), stat], sort_keys=True)

    def describe(self) -> dict:
        return {
            "definition": "mean over images of 100 * max(cos(CLIP image embedding, CLIP text embedding), 0)",
            "library": f"open_clip_torch {_version('open_clip_torch')}",
            "model": self.model_name,
            "weights": str(self.weights) if self.weights else None,
            "preprocess": "the model's evaluation transform (shorter side resized bicubic, centre crop, normalise)",
        }


def _version(dist: str) -> str:
    return version(dist)
