"""The sampler sweep of `muse shapes-eval --sweep-samplers ... --sweep-steps ...`: prompt adherence of a shapes model
on the evaluation prompts against the number of decoding steps, one curve per sampler, with seconds per image.

Every (sampler, steps) cell generates the same prompts from the same per-image seeds (paired samples) and is judged
from its pixels. A cell's numbers are every numeric field of the judge's `AdherenceReport` (nested dicts such as
`per_attribute` flattened to `per_attribute.<key>`), so a measure added to the report later (an outline score, say)
becomes a column of the table and a panel of the plot without a change here. Counts (integers) are not measures.

    <out>/table.md      the table in Markdown, with the model, date and command it comes from
    <out>/results.csv   one row per cell
    <out>/results.json  {"info", "rows"}
    <out>/plot.png, <out>/plot.svg   one panel per measure (and seconds per image) against steps, a line per sampler

`--doc FILE` also writes the table and a link to the SVG plot between the markers `DOC_BEGIN` and `DOC_END` in FILE.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch
from tqdm.auto import tqdm

import sampling

from .. import files
from ..arguments import sampler_text
from .evaluate import EVAL_SEED, evaluate_adherence, generate_images
from .judge import AdherenceReport

DOC_BEGIN = "<!-- shapes-eval sweep: begin (written by the command below; do not edit by hand) -->"
DOC_END = "<!-- shapes-eval sweep: end -->"
FILES = ("table.md", "results.csv", "results.json", "plot.png", "plot.svg")
ATTRIBUTE_ORDER = ("background", "colour", "shape", "size", "position")
TIME_NOTE = (
    "seconds_per_image: wall time of generating the cell's images (text encoding, the decoding steps, VQ decoding; "
    "the judge excluded), batch by batch, divided by the number of images; one untimed warm-up call comes first"
)


def report_measures(report: AdherenceReport) -> dict[str, float]:
    """Every measure of the report: its float fields first, then the float values of its dict fields as
    '<field>.<key>' (attributes in the domain's order). Integers (counts) and anything else are left out."""
    fields = dataclasses.asdict(report)
    measures = {name: float(v) for name, v in fields.items() if _is_measure(v)}
    for name, value in fields.items():
        if isinstance(value, dict):
            keys = [k for k in ATTRIBUTE_ORDER if k in value] + sorted(k for k in value if k not in ATTRIBUTE_ORDER)
            measures.update({f"{name}.{k}": float(value[k]) for k in keys if _is_measure(value[k])})
    return measures


def _is_measure(value) -> bool:
    return isinstance(value, float)


TITLES = {"accuracy": "adherence", "shape_class": "shape class alone", "outline_iou": "outline IoU"}
TITLE_PREFIXES = {"per_attribute.": "", "outline_iou_by_shape.": "outline IoU, "}


def measure_title(name: str) -> str:
    """A column's heading: 'accuracy' -> 'adherence', 'per_attribute.shape' -> 'shape', 'all_right' -> 'all right',
    'outline_iou_by_shape.circle' -> 'outline IoU, circle'."""
    if name in TITLES:
        return TITLES[name]
    for prefix, title in TITLE_PREFIXES.items():
        if name.startswith(prefix):
            return title + name.removeprefix(prefix).replace("_", " ")
    return name.replace("_", " ")


def is_fraction(name: str) -> bool:
    """Measures known to be fractions of images or attributes (shown as percentages)."""
    return name in ("accuracy", "all_right", "shape_class") or name.startswith("per_attribute.")


def check_grid(samplers: Sequence[sampling.Sampler], steps: Sequence[int], guidance_interval) -> None:
    """Refuse, before anything loads, a grid that repeats a cell or whose guidance interval or sampler window does
    not fit one of its step counts."""
    names = [sampler_text(s) for s in samplers]
    if len(set(names)) != len(names) or len(set(steps)) != len(steps):
        raise ValueError(f"the sweep repeats a sampler or a step count: {names} x {list(steps)}")
    for n in steps:
        if guidance_interval is not None:
            sampling.check_interval(guidance_interval, f"--guidance-interval with --sweep-steps {n}", n)
        for s in samplers:
            try:
                s.check(n)
            except ValueError as e:
                raise ValueError(f"sampler {sampler_text(s)} with --sweep-steps {n}: {e}") from None


def run_sweep(
    pipe,
    samplers: Sequence[sampling.Sampler],
    steps: Sequence[int],
    per_triple: int = 2,
    seed: int = EVAL_SEED,
    batch_size: int = 32,
    split: str = "heldout",
    progress: bool = True,
    **options,
) -> list[dict]:
    """One row per (sampler, steps), samplers outermost: sampler (its canonical text), steps, num_images,
    seconds_per_image and the report's measures (`report_measures`). `options` are the other sampling options, the
    same for every cell."""
    check_grid(samplers, steps, options.get("guidance_interval"))
    # one-time costs (thread pools, allocator) land in no cell
    generate_images(pipe, ["a red circle on a blue background"], seed, progress=False, num_inference_steps=2)
    rows = []
    cells = [(s, n) for s in samplers for n in steps]
    for s, n in tqdm(cells, desc="sweep", disable=not progress):
        ev = evaluate_adherence(
            pipe, per_triple, seed, batch_size, progress=False, split=split, sampler=s, num_inference_steps=n, **options
        )
        rows.append(
            {
                "sampler": sampler_text(s),
                "steps": n,
                "num_images": ev.report.num_images,
                "seconds_per_image": ev.seconds_per_image,
                **report_measures(ev.report),
            }
        )
    return rows


def model_source(model: str | Path) -> str:
    """The "source" a model folder's muse.json records (what trained it), else the folder's name."""
    meta = Path(model) / "muse.json"
    try:
        return str(json.loads(meta.read_text()).get("source") or Path(model).name)
    except (OSError, ValueError):
        return Path(model).name or str(model)


def run_info(
    model: str | Path,
    command: str,
    num_prompts: int,
    per_triple: int,
    split: str,
    seed: int,
    options: dict,
    device: str = "cpu",
) -> dict:
    """Where the numbers come from: the model and its recorded source, the date, the command, the prompts, the
    machine."""
    return {
        "model": str(model),
        "model_source": model_source(model),
        "date": date.today().isoformat(),
        "command": command,
        "prompts": {"split": split, "per_triple": per_triple, "count": num_prompts, "seed": seed},
        "options": {k: _jsonable(v) for k, v in options.items()},
        "machine": {
            "device": device,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "time": TIME_NOTE,
    }


def _jsonable(value):
    if isinstance(value, sampling.Sampler):
        return sampler_text(value)
    return list(value) if isinstance(value, tuple) else value


def measure_names(rows: Sequence[dict]) -> list[str]:
    """The measure columns of the rows, in the order they first appear."""
    fixed = {"sampler", "steps", "num_images", "seconds_per_image"}
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k not in fixed and k not in names]
    return names


def _cell(name: str, value) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if is_fraction(name) else f"{value:.3g}"


def markdown_table(rows: Sequence[dict], info: dict) -> str:
    """The table in Markdown, preceded by where it comes from."""
    names = measure_names(rows)
    threads = info["machine"]["torch_threads"]
    lines = [
        f'Model: `{info["model_source"]}` (muse.json "source" of `{Path(info["model"]).name}`); '
        f"{info['prompts']['count']} {info['prompts']['split']} prompts ({info['prompts']['per_triple']} per triple, "
        f"seed {info['prompts']['seed']}); measured {info['date']} on {info['machine']['device']}, {threads} torch "
        "thread(s).",
        "",
        f"Command: `{info['command']}`",
        "",
        "| sampler | steps | " + " | ".join(measure_title(n) for n in names) + " | s / image |",
        "|---|---:|" + "---:|" * len(names) + "---:|",
    ]
    for r in rows:
        cells = [
            f"`{r['sampler']}`",
            str(r["steps"]),
            *(_cell(n, r.get(n)) for n in names),
            f"{r['seconds_per_image']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: Sequence[dict], info: dict, out_dir: Path) -> None:
    """table.md, results.csv (absent values empty) and results.json ({"info", "rows"})."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(out_dir / "table.md", markdown_table(rows, info))
    columns = ["sampler", "steps", "num_images", "seconds_per_image", *measure_names(rows)]
    with (out_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if r.get(k) is None else r[k]) for k in columns} for r in rows)
    files.write_text_atomic(out_dir / "results.json", json.dumps({"info": info, "rows": list(rows)}, indent=1) + "\n")


def plot(rows: Sequence[dict], info: dict, out_dir: Path) -> list[Path]:
    """plot.png and plot.svg: a panel per measure and one of seconds per image, against steps, a line per sampler.
    The SVG keeps its text as text and carries no date, so re-running on the same numbers rewrites the same file."""
    import matplotlib  # heavy, and only for this plot: imported when it is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"), so no display is needed

    names = [*measure_names(rows), "seconds_per_image"]
    columns = min(4, len(names))
    grid_rows = -(-len(names) // columns)
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    with matplotlib.rc_context({"svg.hashsalt": "muse-shapes-sweep", "svg.fonttype": "none"}):
        fig, axes = plt.subplots(grid_rows, columns, figsize=(3.4 * columns, 2.8 * grid_rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            fraction = is_fraction(name)
            for s in samplers:
                pts = sorted((r["steps"], r[name]) for r in rows if r["sampler"] == s and r.get(name) is not None)
                ys = [100 * y if fraction else y for _, y in pts]
                ax.plot([x for x, _ in pts], ys, marker="o", markersize=3, label=s)
            ax.set_title(
                "seconds per image"
                if name == "seconds_per_image"
                else measure_title(name) + (" (%)" if fraction else ""),
                fontsize=9,
            )
            ax.set_xticks(sorted({r["steps"] for r in rows}))
            ax.set_xlabel("steps", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(samplers), fontsize=8, frameon=False)
        fig.suptitle(
            f"{info['model_source']}: {info['prompts']['count']} {info['prompts']['split']} prompts, {info['date']}",
            fontsize=9,
        )
        fig.tight_layout(rect=(0, 0.06 / grid_rows, 1, 1))  # room for the legend below the panels
        paths = [out_dir / "plot.png", out_dir / "plot.svg"]
        fig.savefig(paths[0], dpi=110)
        fig.savefig(paths[1], metadata={"Date": None})
        plt.close(fig)
    return paths


def doc_parts(doc: Path) -> tuple[str, str]:
    """The text of `doc` before DOC_BEGIN and after DOC_END (both markers must be there, once each, in that order)."""
    text = Path(doc).read_text()
    if text.count(DOC_BEGIN) != 1 or text.count(DOC_END) != 1 or text.index(DOC_BEGIN) > text.index(DOC_END):
        raise ValueError(f"{doc}: needs the lines {DOC_BEGIN!r} and {DOC_END!r}, once each, in that order")
    head, rest = text.split(DOC_BEGIN)
    return head, rest.split(DOC_END)[1]


def update_doc(doc: Path, table: str, plot_svg: Path) -> None:
    """Put the table and a link to the SVG plot between DOC_BEGIN and DOC_END in `doc`; the rest is kept."""
    head, tail = doc_parts(doc)
    link = Path(os.path.relpath(Path(plot_svg).resolve(), Path(doc).resolve().parent)).as_posix()
    block = f"{DOC_BEGIN}\n{table}\n![adherence against steps, per sampler]({link})\n{DOC_END}"
    files.write_text_atomic(doc, head + block + tail)


def write_sweep(rows: Sequence[dict], info: dict, out_dir: Path, doc: Path | None = None) -> list[Path]:
    """Every output of the sweep (FILES under `out_dir`, and the block of `doc`); returns the paths written."""
    out_dir = Path(out_dir)
    write_tables(rows, info, out_dir)
    plot(rows, info, out_dir)
    paths = [out_dir / name for name in FILES]
    if doc is not None:
        update_doc(Path(doc), markdown_table(rows, info), out_dir / "plot.svg")
        paths.append(Path(doc))
    return paths
