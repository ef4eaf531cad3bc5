"""The samplers on the command line: `--sampler NAME[:key=value,...]`, `--guidance-interval`, `--guidance-schedule`
and `--sampling-temperature` on `muse generate / img2img / inpaint` (spied on the pipeline's calls), their one-line
refusals, the sampler and guidance-interval dimensions of `muse evaluate`'s grid, and `muse shapes-eval`'s sampler
sweep (its table, plot and doc block). Tiny random-weight models on the CPU, or fakes where only the plumbing is
under test."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import sampling
from muse import Pipeline, arguments, cli
from muse.evaluation import Setting, evaluate, expand_grid
from muse.shapes import sweep
from muse.shapes.judge import AdherenceReport

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def model_dir(published_dirs):
    return str(published_dirs("tiny-256"))


def call(argv: list[str]) -> int:
    """muse.cli.main, with argparse's exit turned into the exit code."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code


# --- the argument types ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("confidence", sampling.ConfidenceSampler()),
        ("halton", sampling.HaltonSampler()),
        ("halton:random_offset=true", sampling.HaltonSampler(random_offset=True)),
        ("random", sampling.RandomSampler()),
        ("remask", sampling.RemaskSampler()),
        ("remask:eta=0.2,strategy=cap", sampling.RemaskSampler(eta=0.2)),
        ("remask: eta=1, strategy=rescale, choose=random", sampling.RemaskSampler(1.0, "rescale", "random")),
        ("remask:steps=2-10", sampling.RemaskSampler(steps=(2, 10))),
        ("remask:steps=none", sampling.RemaskSampler()),
    ],
)
def test_sampler_text_is_parsed_into_the_dataclass_and_printed_back(text, expected):
    parsed = arguments.parse_sampler(text)
    assert parsed == expected
    assert arguments.parse_sampler(arguments.sampler_text(parsed)) == parsed


def test_sampler_text_names_only_the_changed_parameters():
    assert arguments.sampler_text(sampling.RemaskSampler()) == "remask"
    assert arguments.sampler_text("remask:strategy=cap,eta=0.2") == "remask:eta=0.2"
    assert (
        arguments.sampler_text(sampling.RemaskSampler(steps=(1, 4), choose="random"))
        == "remask:choose=random,steps=1-4"
    )
    assert arguments.sampler_text(sampling.HaltonSampler(random_offset=True)) == "halton:random_offset=true"


@pytest.mark.parametrize(
    "text, message",
    [
        ("maskgit", "unknown sampler 'maskgit'; choose one of confidence, halton, random, remask"),
        ("confidence:eta=0.1", "sampler confidence has no parameter 'eta'; it takes no parameters"),
        ("remask:beta=0.1", "sampler remask has no parameter 'beta'; its parameters are eta, strategy, choose, steps"),
        ("remask:eta=nan", "sampler remask eta: expected a finite number, got 'nan'"),
        ("remask:eta=inf", "expected a finite number, got 'inf'"),
        ("remask:eta=1.5", "in [0, 1]"),
        ("remask:eta=abc", "expected a number, got 'abc'"),
        ("remask:strategy=clip", "unknown remask strategy 'clip'; choose one of cap, rescale"),
        ("remask:steps=4", "START-END"),
        ("remask:steps=6-2", "0 <= start <= end"),
        ("remask:eta", "parameters are key=value, got 'eta'"),
        ("remask:eta=0.1,eta=0.2", "given twice"),
        ("halton:random_offset=maybe", "random_offset is true or false, got 'maybe'"),
    ],
)
def test_bad_sampler_texts_name_what_is_wrong(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        arguments.sampler(text)
    assert message in str(e.value)


# --- generate / img2img / inpaint: the flags reach the pipeline -----------------------------------------------------

FLAGS = [
    "--sampler",
    "remask:eta=0.3,choose=random",
    "--guidance-interval",
    "1,3",
    "--guidance-schedule",
    "power-cosine:2",
    "--sampling-temperature",
    "1.5,0.5",
    "--refine-steps",
    "2",
    "--refine-ratio",
    "0.6,0.2",
    "--steps",
    "4",
    "--seed",
    "0",
]
PASSED = dict(
    sampler=sampling.RemaskSampler(eta=0.3, choose="random"),
    guidance_interval=(1, 3),
    guidance_schedule="power-cosine:2",
    sampling_temperature=(1.5, 0.5),
    refine_steps=2,
    refine_ratio=(0.6, 0.2),
    num_inference_steps=4,
)


def _spy(monkeypatch, method: str) -> list[dict]:
    """Record the keyword arguments of Pipeline.<method> (then run the real call)."""
    seen, real = [], getattr(Pipeline, method)

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, method, spy)
    return seen


def _picture(path, size=32):
    y, x = np.mgrid[0:size, 0:size] / size
    PIL.Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint"])
def test_the_sampling_flags_reach_the_pipeline(command, model_dir, tmp_path, monkeypatch):
    method = {"generate": "__call__", "img2img": "img2img", "inpaint": "inpaint"}[command]
    seen = _spy(monkeypatch, method)
    image = _picture(tmp_path / "in.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    extra = {
        "generate": [],
        "img2img": ["--image", image, "--strength", "1"],
        "inpaint": ["--image", image, "--mask", str(tmp_path / "mask.png")],
    }[command]
    out = tmp_path / "out.png"
    assert cli.main([command, "a cat", "--model", model_dir, "--out", str(out), *extra, *FLAGS]) == 0
    assert out.is_file() and len(seen) == 1
    assert {k: seen[0][k] for k in PASSED} == PASSED


def test_unset_flags_leave_the_pipelines_defaults(model_dir, tmp_path, monkeypatch):
    seen = _spy(monkeypatch, "__call__")
    assert cli.main(["generate", "a cat", "--model", model_dir, "--steps", "2", "--out", str(tmp_path / "o.png")]) == 0
    unset = {
        "sampler",
        "guidance_interval",
        "guidance_schedule",
        "sampling_temperature",
        "refine_steps",
        "refine_ratio",
    }
    assert not unset & set(seen[0])


BAD_FLAGS = [
    (["--sampler", "maskgit"], "unknown sampler 'maskgit'"),
    (["--sampler", "remask:eta=nan"], "expected a finite number, got 'nan'"),
    (["--sampler", "remask:bogus=1"], "has no parameter 'bogus'"),
    (["--sampler", "halton:random_offset=2"], "random_offset is true or false"),
    (["--guidance-interval", "3"], "a step interval is 'START,END'"),
    (["--guidance-interval", "5,2"], "a step interval is 'START,END'"),
    (["--guidance-interval=-1,4"], "a step interval is 'START,END'"),
    (["--guidance-interval", "2,20", "--steps", "12"], "--guidance-interval (2, 20) ends after the last step"),
    (["--sampler", "remask:steps=2-20", "--steps", "8"], "remask steps (2, 20) ends after the last step"),
    (["--guidance-schedule", "wobbly"], "unknown guidance schedule 'wobbly'"),
    (["--guidance-schedule", "power-cosine:nan"], "finite exponent"),
    (["--sampling-temperature", "0"], "each > 0, got '0'"),
    (["--sampling-temperature", "nan"], "of finite numbers, got 'nan'"),
    (["--refine-steps", "-1"], "expected an integer >= 0, got '-1'"),
    (["--refine-steps", "1.5"], "expected an integer >= 0, got '1.5'"),
    (["--refine-ratio", "0"], "each in (0, 1], got '0'"),
    (["--refine-ratio", "0.6,1.5"], "each in (0, 1], got '0.6,1.5'"),
    (["--refine-ratio", "nan"], "of finite numbers, got 'nan'"),
]


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint"])
@pytest.mark.parametrize("extra, message", BAD_FLAGS, ids=[" ".join(c[0]) for c in BAD_FLAGS])
def test_bad_sampling_flags_are_refused_in_one_line_before_the_model_loads(command, extra, message, tmp_path, capsys):
    image = _picture(tmp_path / "in.png")
    images = {"generate": [], "img2img": ["--image", image], "inpaint": ["--image", image, "--mask", image]}[command]
    out = tmp_path / "out.png"
    code = call([command, "a cat", "--out", str(out), "--model", str(tmp_path / "no-model"), *images, *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and "no-model" not in err and not out.exists()
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_a_guidance_interval_past_the_models_default_steps_is_one_line(model_dir, tmp_path, capsys):
    """Without --steps the interval is checked by the pipeline against the model's step count (12 here)."""
    assert (
        call(
            ["generate", "a cat", "--model", model_dir, "--guidance-interval", "0,13", "--out", str(tmp_path / "o.png")]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guidance_interval (0, 13)" in err[0]


# --- muse evaluate: samplers and guidance intervals as grid dimensions --------------------------------------------


def _old_key(setting: Setting, context: dict | None = None) -> str:
    """The key as it was computed before the sampler and guidance interval existed."""
    d = {
        "guidance_scale": setting.guidance_scale,
        "num_inference_steps": setting.num_inference_steps,
        "temperature": list(setting.temperature),
        "masking_schedule": setting.masking_schedule,
        "guidance_schedule": setting.guidance_schedule,
        "checkpoint": setting.checkpoint,
        "lora": setting.lora,
    }
    blob = json.dumps({"setting": d, "context": context or {}}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def test_settings_without_the_new_options_keep_their_keys_and_labels():
    for s in (
        Setting(),
        Setting(guidance_scale=4.0, num_inference_steps=8, masking_schedule="linear", lora="a.safetensors"),
    ):
        assert s.key() == _old_key(s) and s.key({"dtype": "float16"}) == _old_key(s, {"dtype": "float16"})
    assert Setting().label() == "cfg10_steps12_temp2-0"


def test_the_grid_has_a_sampler_and_a_guidance_interval_dimension():
    settings = expand_grid(
        guidance_scales=[1, 4],
        num_inference_steps=[4, 8],
        samplers=[None, "halton", sampling.RemaskSampler(eta=0.2)],
        guidance_intervals=[None, (1, 3)],
    )
    assert len(settings) == 2 * 2 * 3 * 2 and len({s.key() for s in settings}) == len(settings)
    assert [s.sampler for s in settings[::8]] == [None, "halton", "remask:eta=0.2"]  # outside the scales and steps
    labels = {s.label() for s in settings}
    assert (
        "cfg4_steps8_temp2-0_sampler-remask-eta0.2_gi1-3" in labels and "cfg1_steps4_temp2-0_sampler-halton" in labels
    )
    assert Setting(sampler="confidence").key() != Setting().key()  # named: the model's default is not assumed
    with pytest.raises(ValueError, match="at 4 steps: guidance interval"):
        expand_grid(num_inference_steps=[4, 8], guidance_intervals=[(0, 6)])
    with pytest.raises(ValueError, match="remask steps"):
        expand_grid(num_inference_steps=[4], samplers=["remask:steps=0-5"])


@dataclass
class FakeGenerator:
    """A generate(setting, prompts, seeds) that records its settings."""

    settings: list = field(default_factory=list)

    def __call__(self, setting, prompts, seeds):
        self.settings.append(setting)
        return [PIL.Image.new("RGB", (16, 16), (s % 256, 0, 0)) for s in seeds]


@pytest.mark.slow
def test_evaluate_writes_the_sampler_into_the_rows_and_the_table(tmp_path):
    settings = expand_grid(num_inference_steps=[4, 8], samplers=[None, "remask:eta=0.2"], guidance_intervals=[(0, 4)])
    rows = evaluate(FakeGenerator(), settings, ["a", "b"], [0], tmp_path, progress=False)
    assert [(r["sampler"], r["guidance_interval"], r["num_inference_steps"]) for r in rows] == [
        (None, [0, 4], 4),
        (None, [0, 4], 8),
        ("remask:eta=0.2", [0, 4], 4),
        ("remask:eta=0.2", [0, 4], 8),
    ]
    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [(t["sampler"], t["guidance_interval"]) for t in table] == [("", "0,4")] * 2 + [
        ("remask:eta=0.2", "0,4")
    ] * 2
    assert [t["label"] for t in table] == [r["label"] for r in rows]
    manifest = json.loads((tmp_path / "manifest.json").read_text())["settings"]
    assert {e["setting"]["sampler"] for e in manifest.values()} == {None, "remask:eta=0.2"}
    # resumed: nothing generated again
    again = FakeGenerator()
    evaluate(again, settings, ["a", "b"], [0], tmp_path, progress=False)
    assert again.settings == []


@pytest.mark.slow
def test_muse_evaluate_passes_the_samplers_to_the_pipeline(model_dir, tmp_path, monkeypatch):
    seen = _spy(monkeypatch, "__call__")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "eval"
    argv = [
        "evaluate",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--model",
        model_dir,
        "--device",
        "cpu",
        "--steps",
        "2",
        "3",
        "--samplers",
        "default",
        "halton:random_offset=true",
        "--guidance-intervals",
        "0,2",
        "--seeds",
        "0",
    ]
    assert call(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["sampler"], r["num_inference_steps"]) for r in rows] == [
        (None, 2),
        (None, 3),
        ("halton:random_offset=true", 2),
        ("halton:random_offset=true", 3),
    ]
    samplers = [kw.get("sampler") for kw in seen]
    assert samplers == [
        None,
        None,
        sampling.HaltonSampler(random_offset=True),
        sampling.HaltonSampler(random_offset=True),
    ]
    assert all(kw["guidance_interval"] == (0, 2) for kw in seen)
    assert (out / "results_plot.png").is_file()


def test_muse_evaluate_refuses_a_bad_sampler_in_one_line(tmp_path, capsys):
    assert call(["evaluate", "--prompts", "x.txt", "--out", str(tmp_path), "--samplers", "halton:offset=1"]) == 2
    assert "sampler halton has no parameter 'offset'" in capsys.readouterr().err


# --- muse shapes-eval: the sampler sweep ------------------------------------------------------------------------------


@dataclass
class ReportWithOutline(AdherenceReport):
    """A report as a judge with an outline measure might give it: extra float fields are picked up generically."""

    outline_iou: float = 0.5
    outline: dict = field(default_factory=lambda: {"circle": 0.25})


class FakeEvaluation:
    def __init__(self, steps, sampler):
        accuracy = 0.5 + steps / 100 + (0.1 if sampler.name == "halton" else 0)
        self.report = ReportWithOutline(accuracy, {"background": 1.0, "shape": accuracy}, 0.25, 21, 63)
        self.seconds_per_image = steps / 1000


def _fake_sweep(monkeypatch) -> list[dict]:
    """Stand-ins for the generation and the judge: each call is recorded."""
    calls = []

    def fake_evaluate(pipe, per_triple, seed, batch_size, progress, split, sampler, num_inference_steps, **options):
        calls.append(dict(sampler=sampler, steps=num_inference_steps, per_triple=per_triple, **options))
        return FakeEvaluation(num_inference_steps, sampler)

    monkeypatch.setattr(sweep, "evaluate_adherence", fake_evaluate)
    monkeypatch.setattr(sweep, "generate_images", lambda *a, **k: (None, 0.0))
    return calls


DOC = f"# Samplers\n\nbefore\n\n{sweep.DOC_BEGIN}\nold table\n{sweep.DOC_END}\n\nafter\n"


@pytest.mark.slow
def test_the_sweep_writes_its_table_plot_and_doc_block(tmp_path, monkeypatch):
    calls = _fake_sweep(monkeypatch)
    samplers = [sampling.ConfidenceSampler(), sampling.HaltonSampler()]
    rows = sweep.run_sweep(None, samplers, [4, 8], per_triple=3, progress=False, guidance_scale=2.0)
    assert [(c["sampler"].name, c["steps"], c["per_triple"], c["guidance_scale"]) for c in calls] == [
        ("confidence", 4, 3, 2.0),
        ("confidence", 8, 3, 2.0),
        ("halton", 4, 3, 2.0),
        ("halton", 8, 3, 2.0),
    ]
    assert list(rows[0]) == [
        "sampler",
        "steps",
        "num_images",
        "seconds_per_image",
        "accuracy",
        "all_right",
        "outline_iou",
        "per_attribute.background",
        "per_attribute.shape",
        "outline.circle",
    ]
    (tmp_path / "doc.md").write_text(DOC)
    info = sweep.run_info(
        tmp_path / "no-model", "muse shapes-eval ...", 63, 3, "heldout", 2024, {"guidance_scale": 2.0}
    )
    paths = sweep.write_sweep(rows, info, tmp_path / "out", tmp_path / "doc.md")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(sweep.FILES)
    assert paths[-1] == tmp_path / "doc.md"
    table = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [(t["sampler"], t["steps"]) for t in table] == [
        ("confidence", "4"),
        ("confidence", "8"),
        ("halton", "4"),
        ("halton", "8"),
    ]
    assert float(table[3]["accuracy"]) == pytest.approx(0.68) and table[0]["outline_iou"] == "0.5"
    md = (tmp_path / "out" / "table.md").read_text()
    assert (
        "| sampler | steps | adherence | all right | outline IoU | background | shape | outline.circle | s / image |"
        in md
    )
    assert "| `halton` | 8 | 68.0% | 25.0% | 0.5 | 100.0% | 68.0% | 0.25 | 0.008 |" in md
    assert "Command: `muse shapes-eval ...`" in md and info["date"] in md
    doc = (tmp_path / "doc.md").read_text()
    assert doc.startswith("# Samplers\n\nbefore\n\n") and doc.endswith(f"{sweep.DOC_END}\n\nafter\n")
    assert "old table" not in doc and md in doc and "](out/plot.svg)" in doc
    svg = (tmp_path / "out" / "plot.svg").read_text()
    assert "<svg" in svg and "seconds per image" in svg and "outline IoU" in svg
    sweep.plot(rows, info, tmp_path / "out")
    assert (tmp_path / "out" / "plot.svg").read_text() == svg  # no date or random ids: re-running rewrites the same


@pytest.mark.slow
def test_the_sweep_command_line_is_recorded_and_runs_on_a_tiny_model(model_dir, tmp_path, monkeypatch):
    seen = _spy(monkeypatch, "__call__")
    (tmp_path / "doc.md").write_text(DOC)
    out = tmp_path / "sweep"
    argv = [
        "shapes-eval",
        "--model",
        model_dir,
        "--sweep-samplers",
        "confidence",
        "remask:eta=0.2",
        "--sweep-steps",
        "2",
        "3",
        "--per-triple",
        "1",
        "--guidance-scale",
        "2",
        "--out",
        str(out),
        "--doc",
        str(tmp_path / "doc.md"),
    ]
    assert call(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert [(r["sampler"], r["steps"], r["num_images"]) for r in data["rows"]] == [
        ("confidence", 2, 21),
        ("confidence", 3, 21),
        ("remask:eta=0.2", 2, 21),
        ("remask:eta=0.2", 3, 21),
    ]
    assert all(r["seconds_per_image"] > 0 and 0 <= r["accuracy"] <= 1 for r in data["rows"])
    assert data["info"]["command"] == (
        f"muse shapes-eval --sweep-samplers confidence remask:eta=0.2 --sweep-steps 2 3 --per-triple 1 --model {model_dir} "
        f"--guidance-scale 2 --out {out} --doc {tmp_path / 'doc.md'}"
    )
    assert data["info"]["model_source"] == Path(model_dir).name  # no muse.json: the folder's name
    timed = [kw for kw in seen if kw["generator"] and len(kw["generator"]) > 1]  # the warm-up call has one prompt
    assert [(kw["sampler"], kw["num_inference_steps"], kw["guidance_scale"]) for kw in timed] == [
        (sampling.ConfidenceSampler(), 2, 2.0),
        (sampling.ConfidenceSampler(), 3, 2.0),
        (sampling.RemaskSampler(eta=0.2), 2, 2.0),
        (sampling.RemaskSampler(eta=0.2), 3, 2.0),
    ]


@pytest.mark.slow
def test_one_shapes_eval_run_passes_the_sampler(model_dir, tmp_path, monkeypatch, capsys):
    seen = _spy(monkeypatch, "__call__")
    argv = [
        "shapes-eval",
        "--model",
        model_dir,
        "--per-triple",
        "1",
        "--steps",
        "3",
        "--sampler",
        "halton",
        "--guidance-interval",
        "0,2",
        "--guidance-schedule",
        "linear",
        "--sampling-temperature",
        "0.8,0.4",
        "--refine-steps",
        "1",
        "--refine-ratio",
        "0.5",
    ]
    assert call(argv) == 0
    assert seen and all(
        (kw["sampler"], kw["guidance_interval"], kw["guidance_schedule"], kw["sampling_temperature"])
        == (sampling.HaltonSampler(), (0, 2), "linear", (0.8, 0.4))
        and (kw["refine_steps"], kw["refine_ratio"]) == (1, 0.5)
        for kw in seen
    )
    assert "s per image" in capsys.readouterr().out


BAD_SWEEPS = [
    (["--sweep-samplers", "confidence"], "a sweep needs --sweep-samplers, --sweep-steps and --out"),
    (["--sweep-samplers", "confidence", "confidence", "--sweep-steps", "4", "--out", "{tmp}/o"], "repeats"),
    (
        ["--sweep-samplers", "confidence", "--sweep-steps", "4", "8", "--guidance-interval", "2,6", "--out", "{tmp}/o"],
        "--guidance-interval with --sweep-steps 4",
    ),
    (["--sweep-samplers", "remask:steps=0-6", "--sweep-steps", "4", "--out", "{tmp}/o"], "with --sweep-steps 4"),
    (
        ["--sweep-samplers", "halton", "--sweep-steps", "4", "--steps", "8", "--out", "{tmp}/o"],
        "--steps: not with a sweep",
    ),
    (
        ["--sweep-samplers", "halton", "--sweep-steps", "4", "--out", "{tmp}/o", "--doc", "{tmp}/plain.md"],
        "needs the lines",
    ),
    (["--sweep-samplers", "halton:x=1", "--sweep-steps", "4", "--out", "{tmp}/o"], "has no parameter 'x'"),
]


@pytest.mark.parametrize("extra, message", BAD_SWEEPS, ids=[c[1][:30] for c in BAD_SWEEPS])
def test_bad_sweeps_are_refused_in_one_line_before_the_model_loads(extra, message, tmp_path, capsys):
    (tmp_path / "plain.md").write_text("# no markers\n")
    argv = ["shapes-eval", "--model", str(tmp_path / "no-model"), *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    assert call(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model" not in err, err
    assert not (tmp_path / "o").exists()


BAD_PROMPT_RUNS = [
    (["--prompt", "a pink circle on a blue background"], "not a caption of the shapes language"),
    (["--prompt", "a red circle on a blue background", "--images", "0"], "--images"),
    (
        ["--prompt", "a red circle on a blue background", "--seed", str(2**63 - 2), "--images", "4"],
        "runs past the largest seed",
    ),
    (
        ["--prompt", "a red circle on a blue background", "--sweep-samplers", "halton", "--sweep-steps", "4"]
        + ["--out", "{tmp}/o"],
        "--prompt: not with a sweep",
    ),
]


@pytest.mark.parametrize("extra, message", BAD_PROMPT_RUNS, ids=[c[1][:30] for c in BAD_PROMPT_RUNS])
def test_bad_prompt_runs_are_refused_in_one_line_before_the_model_loads(extra, message, tmp_path, capsys):
    argv = ["shapes-eval", "--model", str(tmp_path / "no-model"), *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    assert call(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model" not in err, err
    assert not (tmp_path / "o").exists()
