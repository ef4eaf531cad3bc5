"""The speed benchmark runs end to end (tiny models, CPU) and its report says our tokens equal diffusers' tokens.
The figures themselves live in benchmarks/results, measured at full size; here only the script is exercised."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from train.default_model import Recipe
from uvit import UViT

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_speed_benchmark_reports_both_pipelines_with_equal_tokens(tmp_path):
    speed = load_script("speed")
    speed.main(["--tiny", "--device", "cpu", "--layouts", "256", "512", "--batches", "1", "--out", str(tmp_path)])
    (md,) = tmp_path.glob("speed_*.md")
    (png,) = tmp_path.glob("speed_*.png")
    assert png.with_suffix(".svg").read_text().lstrip().startswith("<?xml"), "the SVG plot was not written"
    rows = [line for line in md.read_text().splitlines() if line.startswith(("| 256 |", "| 512 |"))]
    eager = [r for r in rows if "| eager |" in r]
    assert len(eager) == 2, rows
    for row in eager:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0  # diffusers and ours were both timed
        assert cells[9] == "True", f"our tokens differ from diffusers' in {row}"


@pytest.mark.slow
def test_train_speed_benchmark_writes_its_table(tmp_path):
    """The training-speed benchmark on a tiny published-layout model, ours only: the markdown and JSON are written
    with one row per measured recipe, each with a per-step time and a peak RSS (no timing is asserted)."""
    bench = load_script("train_speed")
    rows = ["full", "lora-no-pre-encode"]
    bench.main(["--tiny", "--models", "256", "--rows", *rows, "--steps", "2", "--out", str(tmp_path)])
    md = (tmp_path / "train_speed_cpu_tiny.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| amused-256 |")]
    assert [line.split("|")[2].strip() for line in table] == rows
    data = json.loads((tmp_path / "train_speed_cpu_tiny.json").read_text())
    assert [r["row"] for r in data["results"]] == rows
    for r in data["results"]:
        ours = r["impls"]["ours"]
        assert "errors" not in ours, ours
        assert len(ours["per_step_s"]) == 1 and ours["peak_rss_mb"][0] > 0
        assert "reference" not in r["impls"]  # no --reference given


@pytest.mark.slow
def test_train_speed_profile_writes_its_table_into_a_new_folder(tmp_path):
    """--profile on a tiny model: the profiled step's top operators are written, the output folder created."""
    bench = load_script("train_speed")
    out = tmp_path / "new" / "results"
    bench.main(["--tiny", "--models", "256", "--rows", "lora", "--profile", "--profile_top", "5", "--out", str(out)])
    text = (out / "train_profile_cpu_256_lora.txt").read_text()
    assert "Self CPU" in text and "aten::" in text


def test_train_speed_table_sets_rows_only_ours_runs_beside_the_reference_recipe_row():
    """A row only ours runs (LoRA with --no_pre_encode) is compared with the reference's figures of its recipe's row
    (LoRA), as a ratio of medians, and says which row it borrowed; the recipe row keeps its paired ratios."""
    bench = load_script("train_speed")

    def row(name, ours, reference=None):
        impls = {"ours": {"per_step_s": [ours[0]], "peak_rss_mb": [ours[1] * 1024]}}
        if reference:
            impls["reference"] = {"per_step_s": [reference[0]], "peak_rss_mb": [reference[1] * 1024]}
        return {"model": "256", "row": name, "steps": 5, "alternations": 1, "impls": impls}

    md = bench.table([row("lora", (8.0, 5.0), (10.0, 5.0)), row("lora-no-pre-encode", (4.0, 4.0))])
    lora, pre = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| amused-256 |")]
    assert [c.strip() for c in lora[5:11]] == ["8.00", "10.00", "0.80 (0.8)", "5.00", "5.00", "1.00 (0.7)"]
    assert [c.strip() for c in pre[5:11]] == [
        "4.00",
        "10.00 (lora row)",
        "0.40 (0.8)",
        "4.00",
        "5.00 (lora row)",
        "0.80 (0.7)",
    ]


def test_train_speed_per_step_time_subtracts_a_short_run_of_one_step_per_image():
    """With 4 images the short run takes 4 steps: per step = (long - short) / (N - 4), pair by pair."""
    bench = load_script("train_speed")
    runs = {"long": [{"seconds": 100.0, "peak_rss_mb": 10.0}], "short": [{"seconds": 60.0, "peak_rss_mb": 9.0}]}
    result = bench.summarize(
        {"model": "256", "row": "lora", "steps": 8, "images": 4, "impls": {"ours": {"runs": runs}}}
    )
    assert result["impls"]["ours"]["per_step_s"] == [10.0] and result["impls"]["ours"]["peak_rss_mb"] == [10.0]
    one = bench.summarize({"model": "256", "row": "lora", "steps": 5, "images": 1, "impls": {"ours": {"runs": runs}}})
    assert one["impls"]["ours"]["per_step_s"] == [10.0]
    with pytest.raises(SystemExit):  # the short run must be shorter than the long one
        bench.main(["--tiny", "--images", "3", "--steps", "3"])


def test_default_model_step_benchmark_splits_the_forward_flops_and_times_each_batch(capsys):
    bench = load_script("default_model_step")
    cfg = Recipe.reduced().uvit_config
    model = UViT(cfg)
    gflop, shares = bench.forward_flop_shares(model, bench.random_inputs(cfg, 2, 77))
    assert gflop > 0
    whole = shares["transformer layers"] + shares["conv stages"] + shares["head"]
    assert 0.5 < whole <= 1.0  # the three parts are disjoint and hold most of the work
    assert 0 < shares["  their GEGLU feed-forwards"] < shares["transformer layers"]
    bench.main(["--recipe", "reduced", "--batches", "2", "4", "--samples", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert "batch    2:" in out and "batch    4:" in out and "ms per sample" in out


@pytest.mark.slow
def test_default_model_step_benchmark_times_the_compiled_step_beside_the_eager_one(capsys):
    bench = load_script("default_model_step")
    bench.main(["--recipe", "reduced", "--compile", "--batches", "2", "--samples", "4", "--alternations", "2"])
    out = capsys.readouterr().out
    assert "compiling took" in out and out.count("compiled / eager") == 3 and "medians:" in out


@pytest.mark.slow
def test_default_model_step_benchmark_times_every_variant_in_turn(capsys):
    bench = load_script("default_model_step")
    bench.main(["--recipe", "reduced", "--variants", "--batches", "2", "--samples", "4", "--alternations", "2"])
    out = capsys.readouterr().out
    assert out.count("median") == len(bench.VARIANTS) == 5
    assert "77 text tokens, fp32, eager" in out and "16 text tokens, bf16 autocast, compiled" in out
