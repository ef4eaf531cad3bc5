"""One evaluation: generate the sweep (resumable), then score every setting and write the table, plot and grids.

    rows = evaluate(generate, settings, prompts, seeds, out_dir, clip=ClipScorer(...), fid=InceptionFID(...),
                    fid_reference="coco_val_256/")

The metric objects are built by the caller before anything is generated, so missing weights fail at once, not after
hours of sampling. A metric left out (clip=None, fid=None) is reported as absent, with the reason, never as 0.

Metric values are cached in <out>/metrics_cache.json under a signature of the metric (implementation, weights file)
and the setting's exact images (files and prompts; and for FID the reference set), so a resumed run scores only the
settings whose images changed. Images are read from their files in batches, never all at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import PIL.Image

from . import report
from .clip_score import ClipScorer
from .fid import InceptionFID, feature_statistics, frechet_distance, list_images
from .sweep import GenerateFn, Setting, SettingImages, run_sweep

log = logging.getLogger(__name__)

METRICS_CACHE = "metrics_cache.json"
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

    cache = _MetricCache(out_dir / METRICS_CACHE)
    references: dict[tuple[int, int], tuple[dict, int]] = {}  # reference statistics by image size (W, H)
    rows = []
    for result in sweep:
        row = _setting_row(result)
        files = [out_dir / r.file for r in result.records]
        images_id = [(r.file, r.prompt) for r in result.records]
        if clip is not None:
            values = cache.get(
                [clip.fingerprint(), images_id], lambda files=files, result=result: _clip_values(clip, files, result)
            )
            row.update(values)
        if fid is not None:
            if len(files) < 2:
                row["notes"].append(f"FID absent: it needs at least 2 images per setting, this one has {len(files)}")
            else:
                size = _image_size(files[0])
                signature = [fid.fingerprint(), fid.reference_id(fid_reference, size), images_id]
                row["fid"] = cache.get(
                    signature,
                    lambda files=files, size=size: {"fid": _fid(fid, files, fid_reference, size, references, out_dir)},
                )["fid"]
        rows.append(row)
        _write_grid(out_dir, result, len(prompts), len(seeds), max_grid_images)
        log.info("%s: %s", row["label"], {k: row[k] for k in ("seconds_per_image", "clip_score", "fid")})

    info = {
        "prompts": {"source": prompt_source, "count": len(prompts)},
        "seeds": list(seeds),
        "context": context or {},
        "metrics": {
            "clip_score": clip.describe() if clip else {"computed": False, "reason": "not requested (no --clip-model)"},
            "fid": _fid_info(fid, fid_reference, references, out_dir, sweep),
            "time": TIME_NOTE,
        },
    }
    report.write_tables(rows, info, out_dir)
    report.plot_metrics(rows, out_dir / "results_plot.png", _plot_title(rows, clip, fid))
    return rows


def _plot_title(rows: list[dict], clip: ClipScorer | None, fid: InceptionFID | None) -> str:
    counts = sorted({r["num_images"] for r in rows})
    parts = [f"{'/'.join(map(str, counts))} images per setting"]
    if fid is not None:
        parts.append("FID: torch-fidelity Inception, TF-compatible bilinear resize to 299")
    if clip is not None:
        parts.append(f"CLIP score: open_clip {clip.model_name}")
    return "; ".join(parts)


class _MetricCache:
    """{signature: values} in a JSON file, written atomically after every new entry."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, signature, compute) -> dict:
        key = hashlib.sha1(json.dumps(signature, sort_keys=True).encode()).hexdigest()
        if key not in self.entries:
            self.entries[key] = compute()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.entries))
            os.replace(tmp, self.path)
        return self.entries[key]


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


def _image_size(path: Path) -> tuple[int, int]:
    with PIL.Image.open(path) as im:
        return im.size


def _clip_values(clip: ClipScorer, files: list[Path], result: SettingImages) -> dict:
    scores = clip.scores_of_files(files, [r.prompt for r in result.records])
    return {"clip_score": float(scores.mean()), "clip_score_std": float(scores.std()) if len(scores) > 1 else None}


def _fid(fid: InceptionFID, files: list[Path], reference, size, references: dict, out_dir: Path) -> float:
    if size not in references:
        references[size] = fid.reference_statistics(reference, size, cache_dir=out_dir)
    return frechet_distance(feature_statistics(fid.features_of_files(files)), references[size][0])


def _fid_info(fid: InceptionFID | None, reference, references: dict, out_dir: Path, sweep) -> dict:
    if fid is None:
        return {"computed": False, "reason": "not requested (no --fid-reference)"}

    sizes = {_image_size(out_dir / r.records[0].file) for r in sweep if r.records}
    counts = {f"{w}x{h}": len(list_images(reference)) for (w, h) in sorted(sizes)}
    return {
        **fid.describe(),
        "reference": str(reference),
        "num_reference_images": counts,
        "caveat": "FID is biased upwards on small sets; compare numbers computed on equal set sizes only",
    }


def _write_grid(out_dir: Path, result: SettingImages, num_prompts: int, num_seeds: int, max_images: int) -> None:
    """A row per seed, a column per prompt (the first ones, at most `max_images` images)."""
    show_prompts, show_seeds = report.grid_shape(num_prompts, num_seeds, max_images)
    # records are in (seed, prompt) order: record j is seed j // num_prompts, prompt j % num_prompts
    picked = []
    for s in range(show_seeds):
        for p in range(show_prompts):
            with PIL.Image.open(out_dir / result.records[s * num_prompts + p].file) as im:
                picked.append(im.convert("RGB"))
    folder = out_dir / "grids"
    folder.mkdir(exist_ok=True)
    report.image_grid(picked, show_prompts, folder / f"{result.setting.label()}_{result.key}.png")
