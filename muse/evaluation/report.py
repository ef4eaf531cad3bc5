"""What an evaluation writes: results.csv / results.json (one row per setting), a plot of FID and CLIP score against
the guidance scale (or the steps, for a sweep over steps at one guidance scale), and an image grid per setting. A
metric that was not computed is empty in the CSV and null in the JSON, never 0."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import PIL.Image

from muse.images import make_grid

# Columns of the table, in order. Settings first, then the measurements.
COLUMNS = (
    "label",
    "key",
    "checkpoint",
    "lora",
    "guidance_scale",
    "num_inference_steps",
    "temperature",
    "masking_schedule",
    "guidance_schedule",
    "sampler",
    "guidance_interval",
    "num_images",
    "generated_now",
    "seconds_per_image",
    "clip_score",
    "clip_score_std",
    "fid",
)
METRICS = ("fid", "clip_score")
METRIC_TITLES = {"fid": "FID (lower is better)", "clip_score": "CLIP score (higher is better)"}


def write_tables(rows: Sequence[dict], info: dict, out_dir: Path) -> tuple[Path, Path]:
    """results.csv (absent values empty) and results.json ({"info", "rows"}, absent values null)."""
    out_dir = Path(out_dir)
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in COLUMNS})
    json_path.write_text(json.dumps({"info": info, "rows": list(rows)}, indent=2))
    return csv_path, json_path


def _csv_cell(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return value


# the axes a plot can run along: row key -> (axis title, index of that setting's part in the label)
AXES = {"guidance_scale": ("guidance scale", 0), "num_inference_steps": ("decoding steps", 1)}


def plot_axis(rows: Sequence[dict]) -> str:
    """The plot's x axis: the guidance scale, unless it is the same in every row and the steps are not."""
    if len({r["guidance_scale"] for r in rows}) == 1 and len({r["num_inference_steps"] for r in rows}) > 1:
        return "num_inference_steps"
    return "guidance_scale"


def _curve_name(row: dict, axis: str) -> str:
    """Everything that identifies a setting except its value on the plot's axis (the label without that part)."""
    parts = row["label"].split("_")
    del parts[AXES[axis][1]]
    return "_".join(parts)


def plot_metrics(rows: Sequence[dict], path: Path, title: str | None = None) -> Path:
    """FID and CLIP score (one panel each) against the guidance scale, one line per other combination of settings,
    as the published aMUSEd quality plots; against the decoding steps instead when the grid varies the steps and
    not the guidance scale (a sampler sweep). A metric with no values gets a panel saying it was not computed."""
    import matplotlib  # heavy, and only for this plot: imported when it is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display is needed

    axis = plot_axis(rows)
    curves: dict[str, list[dict]] = {}
    for row in rows:
        curves.setdefault(_curve_name(row, axis), []).append(row)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 4.2))
    for ax, metric in zip(axes, METRICS):
        ax.set_title(METRIC_TITLES[metric])
        ax.set_xlabel(AXES[axis][0])
        drawn = False
        for name, points in curves.items():
            pts = sorted((r[axis], r[metric]) for r in points if r.get(metric) is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
                drawn = True
        if drawn:
            ax.grid(alpha=0.3)
            if len(curves) > 1:
                ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"{metric} not computed", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def image_grid(images: Sequence[PIL.Image.Image], cols: int, path: Path) -> Path:
    """Tile the images `cols` per row and save them."""
    make_grid(list(images), cols=max(1, min(cols, len(images)))).save(path)
    return Path(path)


def grid_shape(num_prompts: int, num_seeds: int, max_images: int) -> tuple[int, int]:
    """(prompts, seeds) to show: a row per seed, a column per prompt, at most `max_images` in all."""
    seeds = max(1, min(num_seeds, int(math.sqrt(max_images))))
    return max(1, min(num_prompts, max_images // seeds)), seeds
