"""The README figures of a shapes model: a captioned grid of generated images, and one image decoded step by step.

python -m train.default_model --figures docs   # docs/default_model_grid.png and docs/default_model_decoding.png
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..pipeline import Pipeline
from .domain import HELDOUT

FIGURE_PROMPTS = (
    "a red circle on a blue background",
    "a small yellow triangle at the top left on a black background",
    "a large white square in the center on a purple background",
    "a green circle at the bottom right on a white background",
    "an orange triangle on a blue background",  # held out of training
    "a blue circle on a yellow background",  # held out
    "a black square at the top right on a red background",  # held out
    "a purple square on a yellow background",  # held out
)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def figure_grid(pipe, prompts=FIGURE_PROMPTS, seed: int = 0, scale: int = 2, columns: int = 4):
    """A PIL image: each prompt's generated image (seed `seed`, default settings), enlarged `scale` x, captioned."""
    images = pipe(list(prompts), generator=[torch.Generator().manual_seed(seed) for _ in prompts], progress_bar=False)
    side, pad, text_h = 64 * scale, 8, 44
    rows = (len(prompts) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + text_h + pad) + pad), "white")
    draw, font = ImageDraw.Draw(canvas), _font(11)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        r, c = divmod(i, columns)
        x, y = pad + c * (side + pad), pad + r * (side + text_h + pad)
        canvas.paste(image.resize((side, side), Image.NEAREST), (x, y))
        held = any(f"{c} {s} " in prompt and prompt.endswith(f" {b} background") for c, b, s in HELDOUT)
        label = _wrap(prompt + (" (held out)" if held else ""), 24)
        for k, line in enumerate(label[:3]):
            draw.text((x, y + side + 2 + 13 * k), line, fill="black", font=font)
    return canvas


def figure_decoding(pipe, prompt: str = FIGURE_PROMPTS[0], seed: int = 0, scale: int = 3, columns: int = 6):
    """A PIL image of one image's decoding, step by step: after step k, the tokens known so far are shown (each token
    is a 4x4 pixel patch of the image the last step decodes to) and the still-masked ones are grey. When the model's
    defaults refine after decoding (`refine_steps`), a last frame shows the refined image and how many tokens the
    passes changed."""
    steps: list[torch.Tensor] = []
    final = pipe(
        prompt,
        generator=torch.Generator().manual_seed(seed),
        progress_bar=False,
        output_type="latent",
        callback=lambda i, t, tokens: steps.append(tokens[0].clone()),
        callback_steps=1,
    )[0]  # (h, w) token ids
    passes = pipe.sampling_defaults.get("refine_steps", 0)
    frames = [
        (tokens, f"step {k + 1}: {int((tokens != pipe.mask_token_id).sum())}/{tokens.numel()} tokens")
        for k, tokens in enumerate(steps)
    ]
    if passes:
        changed = int((final != steps[-1]).sum())
        frames.append((final, f"{passes} refinements: {changed} changed"))
    with torch.no_grad():
        decoded = pipe.vqvae.decode(torch.stack([steps[-1], final]).to(pipe.vqvae.device)).clamp(0, 1).float().cpu()
    f = pipe.vae_scale_factor
    side, pad, text_h = 64 * scale, 6, 16
    rows = (len(frames) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (side + pad) + pad, rows * (side + text_h + pad) + pad + 18), "white")
    draw, font = ImageDraw.Draw(canvas), _font(12)
    title = f'"{prompt}": tokens known after each of {len(steps)} steps'
    draw.text((pad, 4), title + (f", then {passes} refinement passes" if passes else ""), fill="black", font=font)
    checker = 0.55 + 0.1 * ((torch.arange(64)[:, None] // 4 + torch.arange(64)[None, :] // 4) % 2).float()
    for k, (tokens, label) in enumerate(frames):
        pixels = decoded[1] if k == len(steps) else decoded[0]  # (3, 64, 64): the refined image or the last step's
        known = (tokens != pipe.mask_token_id).float()  # (h, w)
        known_px = known.repeat_interleave(f, 0).repeat_interleave(f, 1)  # (64, 64)
        frame = pixels * known_px + checker * (1 - known_px)
        array = (frame.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        r, c = divmod(k, columns)
        x, y = pad + c * (side + pad), 22 + r * (side + text_h + pad)
        canvas.paste(Image.fromarray(array).resize((side, side), Image.NEAREST), (x, y))
        draw.text((x, y + side + 1), label, fill="black", font=font)
    return canvas


def make_figures(model_dir, docs: Path, device: str = "cpu") -> list[Path]:
    """docs/default_model_grid.png and docs/default_model_decoding.png from the model in `model_dir`."""
    pipe = Pipeline.from_pretrained(model_dir, device=device)
    docs.mkdir(parents=True, exist_ok=True)
    paths = [docs / "default_model_grid.png", docs / "default_model_decoding.png"]
    figure_grid(pipe).save(paths[0], optimize=True)
    figure_decoding(pipe).save(paths[1], optimize=True)
    return paths


def figure_curve(curve: list[dict], path: Path, title: str) -> Path:
    """An SVG of held-out adherence (overall and per attribute, %) against training minutes, from the rows of a
    recipe report's learning curve (`train.default_model.learning_curve`: minutes, accuracy, per_attribute). Text
    stays text and the file carries no date, so the same numbers redraw the same file."""
    import matplotlib  # heavy, and only for this figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    if not curve:
        raise ValueError("the report has no learning curve (run the recipe with curve points)")
    rows = sorted(curve, key=lambda r: r["minutes"])
    minutes = [r["minutes"] for r in rows]
    with matplotlib.rc_context({"svg.hashsalt": "muse-default-curve", "svg.fonttype": "none"}):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.plot(minutes, [100 * r["accuracy"] for r in rows], marker="o", linewidth=2.2, color="black", label="all")
        for name in sorted(rows[0]["per_attribute"]):
            ys = [100 * r["per_attribute"][name] for r in rows]
            ax.plot(minutes, ys, marker=".", linewidth=1, alpha=0.8, label=name)
        ax.set_xlabel("minutes since the recipe started (2-core CPU)", fontsize=9)
        ax.set_ylabel("held-out attributes right (%)", fontsize=9)
        ax.set_ylim(0, 100)
        ax.set_xlim(0, max(minutes) * 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", ncol=2)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, metadata={"Date": None})
        plt.close(fig)
    return path
