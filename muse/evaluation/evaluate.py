"""One evaluation: generate the sweep (resumable), then score every setting and write the table, plot and grids.

    rows = evaluate(generate, settings, prompts, seeds, out_dir, clip=ClipScorer(...), fid=InceptionFID(...),
                    fid_reference="coco_val_256/")

The metric objects are built by the caller before anything is generated, so missing weights fail at once, not after
hours of sampling. A metric left out (clip=None, fid=None) is reported as absent, with the reason, never as 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import PIL.Image

from . import report
from .clip_score import ClipScorer
from .fid import InceptionFID, feature_statistics, frechet_distance
from .sweep import GenerateFn, Setting, SettingImages, run_sweep

log = logging.getLogger(__name__)

TIME_NOTE = (
    "seconds_per_image: wall time of one generate call (text encoding, decoding steps, VQ decoding, conversion to "
    "images) divided by its batch size, averaged over the setting's images; images reused from an earlier run keep "
    "the time measured then"
)


def evaluate(
    generate: GenerateFn,
    settings: Sequence[Setting],
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    clip: ClipScorer | None = None,
    fid: InceptionFID | None = None,
    fid_reference: str | Path | None = None,
    context: dict | None = None,
    prompt_source: str | None = None,
    max_grid_images: int = 64,
    progress: bool = True,
) -> list[dict]:
    """Run the sweep and write results.csv, results.json, results_plot.png and grids/<label>_<key>.png under
    `out_dir`. Returns the table rows (one dict per setting, absent metrics None)."""
    if (fid is None) != (fid_reference is None):
        raise ValueError("FID needs both a feature extractor and a reference folder")
    out_dir = Path(out_dir)
    sweep = run_sweep(generate, settings, prompts, seeds, out_dir, batch_size, context, progress)

    reference_stats: dict[tuple[int, int], tuple[dict, int]] = {}  # by image size (W, H)
    rows = []
    for result in sweep:
        images = _load_images(out_dir, result)
        row = _setting_row(result)
        if clip is not None:
            scores = clip.scores(images, [r.prompt for r in result.records])
            row["clip_score"] = float(scores.mean())
            row["clip_score_std"] = float(scores.std()) if len(scores) > 1 else None
        if fid is not None:
            row["fid"], note = _fid(fid, images, fid_reference, reference_stats, out_dir)
            if note:
                row["notes"].append(note)
        rows.append(row)
        _write_grid(images, result, len(prompts), len(seeds), max_grid_images, out_dir)
        log.info("%s: %s", row["label"], {k: row[k] for k in ("seconds_per_image", "clip_score", "fid")})

    info = {
        "prompts": {"source": prompt_source, "count": len(prompts)},
        "seeds": list(seeds),
        "context": context or {},
        "metrics": {
            "clip_score": clip.describe() if clip else {"computed": False, "reason": "not requested (no --clip-model)"},
            "fid": _fid_info(fid, fid_reference, reference_stats),
            "time": TIME_NOTE,
        },
    }
    report.write_tables(rows, info, out_dir)
    report.plot_against_guidance(rows, out_dir / "results_plot.png")
    return rows


def _setting_row(result: SettingImages) -> dict:
    s = result.setting
    return {
        "label": s.label(),
        "key": result.key,
        **s.as_dict(),
        "num_images": len(result.records),
        "generated_now": result.generated,
        "seconds_per_image": result.seconds_per_image,
        "clip_score": None,
        "clip_score_std": None,
        "fid": None,
        "notes": [],
    }


def _load_images(out_dir: Path, result: SettingImages) -> list[PIL.Image.Image]:
    images = []
    for r in result.records:
        with PIL.Image.open(out_dir / r.file) as im:
            images.append(im.convert("RGB"))
    return images


def _fid(fid: InceptionFID, images, reference: str | Path, cache: dict, out_dir: Path) -> tuple[float | None, str | None]:
    if len(images) < 2:
        return None, f"FID absent: it needs at least 2 images per setting, this one has {len(images)}"
    size = images[0].size
    if size not in cache:
        cache[size] = fid.reference_statistics(reference, size, cache_dir=out_dir)
    return frechet_distance(feature_statistics(fid.features(images)), cache[size][0]), None


def _fid_info(fid: InceptionFID | None, reference, reference_stats: dict) -> dict:
    if fid is None:
        return {"computed": False, "reason": "not requested (no --fid-reference)"}
    counts = {f"{w}x{h}": n for (w, h), (_, n) in reference_stats.items()}
    return {**fid.describe(), "reference": str(reference), "num_reference_images": counts,
            "caveat": "FID is biased upwards on small sets; compare numbers computed on equal set sizes only"}


def _write_grid(images, result: SettingImages, num_prompts: int, num_seeds: int, max_images: int, out_dir: Path) -> None:
    """A row per seed, a column per prompt (the first ones, at most `max_images` images)."""
    show_prompts, show_seeds = report.grid_shape(num_prompts, num_seeds, max_images)
    # records are in (seed, prompt) order: record j is seed j // num_prompts, prompt j % num_prompts
    picked = [images[s * num_prompts + p] for s in range(show_seeds) for p in range(show_prompts)]
    folder = out_dir / "grids"
    folder.mkdir(exist_ok=True)
    report.image_grid(picked, show_prompts, folder / f"{result.setting.label()}_{result.key}.png")
