"""Prompt adherence of a shapes model: generate an image for each evaluation prompt, judge it from its pixels, and
report the fraction of stated attributes that are right (`muse shapes-eval`, in muse.shapes.command)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import PIL.Image
import torch
from tqdm.auto import tqdm

from .domain import SPLITS, captions, parse_caption, sample_scenes
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
    seconds: float = 0.0  # wall time of the generation (all batches; the judge excluded)

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / len(self.prompts)

    def rows(self) -> list[dict]:
        """One JSON-ready record per image."""
        return [
            {"prompt": p, "expected": e, "judged": {**v.as_dict(), "outline_ok": v.outline_ok}, "right": m}
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
def generate_images(
    pipe, prompts: list[str], seed: int = EVAL_SEED, batch_size: int = 32, progress: bool = True, **options
) -> tuple[torch.Tensor, float]:
    """Image i of `prompts` from its own generator seeded seed + i (whatever the batch size) -> (images (N, 3, H, W)
    in [0, 1], wall seconds of the generation)."""
    images = []
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(prompts), batch_size), desc="shapes-eval", disable=not progress):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, generator=gens, output_type="np", progress_bar=False, **options)  # (B, H, W, 3) in [0, 1]
        images.append(torch.from_numpy(out).permute(0, 3, 1, 2).float())
    return torch.cat(images), time.perf_counter() - t0


def evaluate_adherence(
    pipe,
    per_triple: int = 2,
    seed: int = EVAL_SEED,
    batch_size: int = 32,
    progress: bool = True,
    split: str = "heldout",
    **options,
) -> Evaluation:
    """Generate one image per evaluation prompt of `split` with `pipe` (image i from its own generator seeded
    seed + i; other sampling options at the pipeline's defaults unless given), judge each, and score the stated
    attributes."""
    scenes, prompts = evaluation_prompts(per_triple, seed, split)
    expected = [scenes.attributes(i) for i in range(len(scenes))]
    return _generate_and_judge(pipe, prompts, expected, seed, batch_size, progress, **options)


def _generate_and_judge(pipe, prompts, expected, seed, batch_size, progress, **options) -> Evaluation:
    """Image i of `prompts` from seed + i, judged against expected[i]."""
    images, seconds = generate_images(pipe, prompts, seed, batch_size, progress, **options)
    verdicts = judge(images)
    marks = [score(e, v) for e, v in zip(expected, verdicts)]
    return Evaluation(summarise(marks, expected, verdicts), prompts, expected, verdicts, marks, images, seconds)


def evaluate_prompt(
    pipe,
    prompt: str,
    num_images: int = 32,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    **options,
) -> Evaluation:
    """One caption of the prompt language drawn `num_images` times, image i from its own generator seeded seed + i
    (the images `muse generate PROMPT --seed SEED --num-images N` draws), each judged against what the caption
    states: how often a user's command gives a right image."""
    expected = parse_caption(prompt)
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    return _generate_and_judge(
        pipe, [prompt] * num_images, [dict(expected) for _ in range(num_images)], seed, batch_size, progress, **options
    )


def save_grid(images: torch.Tensor, path, columns: int = 8, pad: int = 2) -> None:
    """images (N, 3, H, W) in [0, 1] -> one PNG of a grid with `pad` white pixels between images."""
    n, _, H, W = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.ones(3, rows * (H + pad) + pad, columns * (W + pad) + pad)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = (
            images[i]
        )
    array = (canvas.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    PIL.Image.fromarray(array).save(path)
