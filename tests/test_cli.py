"""`muse generate / img2img / inpaint` (the console script; alias `python -m muse`) at tiny size, on a saved tiny model folder (the published layout).

Each command's images are checked against `muse.Pipeline` called directly with the seeds the command line
documents (image i uses seed + i), so the command line adds nothing to, and loses nothing of, the pipeline."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import muse.shapes.embedded
from muse import Pipeline, cli
from tests.helpers import run_muse

STEPS = "3"


@pytest.fixture(scope="module")
def model_dir(published_dirs):
    return str(published_dirs("tiny-256"))


@pytest.fixture(scope="module")
def pipe(model_dir):
    return Pipeline.from_pretrained(model_dir)


def expected(pipe, method, *args, seeds, **kwargs):
    call = getattr(pipe, method) if method != "generate" else pipe
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    images = call(
        *args,
        num_inference_steps=int(STEPS),
        generator=gens,
        num_images_per_prompt=len(seeds),
        progress_bar=False,
        **kwargs,
    )
    return [np.asarray(im) for im in images]


def picture(path, size=32):
    y, x = np.mgrid[0:size, 0:size] / size
    PIL.Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_generate_several_images_writes_each_and_a_grid(model_dir, pipe, tmp_path, capsys):
    out = tmp_path / "cats"
    assert (
        cli.main(
            [
                "generate",
                "a cat",
                "--model",
                model_dir,
                "--steps",
                STEPS,
                "--seed",
                "7",
                "--num-images",
                "3",
                "--negative-prompt",
                "blurry",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = sorted(p.name for p in out.iterdir())
    assert written == ["grid.png", "image-000.png", "image-001.png", "image-002.png"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in written[1:] + written[:1]]
    want = expected(pipe, "generate", "a cat", seeds=[7, 8, 9], negative_prompt="blurry")
    for i in range(3):
        assert np.array_equal(np.asarray(PIL.Image.open(out / f"image-{i:03d}.png")), want[i])
    grid = PIL.Image.open(out / "grid.png")
    assert grid.size == (64, 64)  # 2 x 2 cells of 32 px, the last one empty
    assert np.array_equal(np.asarray(grid)[:32, 32:], want[1])


@pytest.mark.slow
def test_generate_one_image_to_a_file_with_size(model_dir, pipe, tmp_path):
    out = tmp_path / "one.png"
    assert (
        cli.main(
            [
                "generate",
                "a dog",
                "--model",
                model_dir,
                "--steps",
                STEPS,
                "--seed",
                "8",
                "--height",
                "24",
                "--width",
                "40",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert list(tmp_path.iterdir()) == [out]
    # seed 8 alone gives image 1 of the seed-7 run: any image can be made again alone
    assert np.array_equal(
        np.asarray(PIL.Image.open(out)), expected(pipe, "generate", "a dog", seeds=[8], height=24, width=40)[0]
    )


@pytest.mark.slow
def test_img2img(model_dir, pipe, tmp_path):
    image = picture(tmp_path / "in.png")
    out = tmp_path / "edit.png"
    assert (
        cli.main(
            [
                "img2img",
                "a watercolour",
                "--image",
                str(image),
                "--strength",
                "0.7",
                "--model",
                model_dir,
                "--steps",
                STEPS,
                "--seed",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    want = expected(pipe, "img2img", "a watercolour", PIL.Image.open(image).convert("RGB"), strength=0.7, seeds=[1])
    assert np.array_equal(np.asarray(PIL.Image.open(out)), want[0])


@pytest.mark.slow
def test_inpaint_with_paste(model_dir, pipe, tmp_path):
    image = picture(tmp_path / "in.png")
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    PIL.Image.fromarray(m).save(tmp_path / "mask.png")
    out = tmp_path / "fill.png"
    assert (
        cli.main(
            [
                "inpaint",
                "a red ball",
                "--image",
                str(image),
                "--mask",
                str(tmp_path / "mask.png"),
                "--paste-unmasked",
                "--model",
                model_dir,
                "--steps",
                STEPS,
                "--seed",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    want = expected(
        pipe,
        "inpaint",
        "a red ball",
        PIL.Image.open(image).convert("RGB"),
        PIL.Image.fromarray(m),
        paste_unmasked=True,
        seeds=[2],
    )
    got = np.asarray(PIL.Image.open(out))
    assert np.array_equal(got, want[0])
    assert np.array_equal(got[m == 0], np.asarray(PIL.Image.open(image))[m == 0])


def test_without_model_and_without_embedded_default_the_error_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(muse.shapes.embedded, "MODEL_DIR", tmp_path / "absent")
    assert cli.main(["generate", "a cat"]) == 2
    err = capsys.readouterr().err
    assert "no embedded default model found at" in err and str(tmp_path / "absent") in err and "--model" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a", "--out", "x.jpg"], ".png file or a folder"),
        (["generate", "a", "--height", "30"], "multiple of 4"),
        (["generate", "a", "--steps", "0"], "argument --steps: expected an integer >= 1"),
        (["generate", "a", "--num-images", "0"], "argument --num-images: expected an integer >= 1"),
        (["img2img", "a", "--image", "missing.png"], "no image file"),
        (["img2img", "a", "--image", "{tmp}/in.png", "--strength", "0"], r"(0, 1]"),
    ],
)
def test_bad_arguments_give_a_clear_error(argv, message, model_dir, tmp_path, capsys):
    picture(tmp_path / "in.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[2:3] != ["--out"]:
        argv += ["--out", str(tmp_path / "o.png")]
    try:
        code = cli.main(argv + ["--model", model_dir])
    except SystemExit as e:  # refused by argparse itself, before anything runs
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_subcommands_can_be_registered_from_other_modules(monkeypatch, capsys):
    calls = []

    def add_parser(subparsers):
        p = subparsers.add_parser("hello")
        p.add_argument("--name", default="world")
        p.set_defaults(func=lambda args: calls.append(args.name) or 0)
        return p

    monkeypatch.setattr(cli, "_REGISTRY", list(cli._REGISTRY))
    cli.register(add_parser)
    assert cli.main(["hello", "--name", "muse"]) == 0 and calls == ["muse"]


@pytest.mark.slow
def test_the_muse_console_script_generates_with_a_progress_bar(model_dir, tmp_path):
    out = tmp_path / "cli.png"
    r = run_muse(["generate", "a cat", "--model", model_dir, "--steps", STEPS, "--seed", "0", "--out", str(out)])
    assert out.is_file() and PIL.Image.open(out).size == (32, 32)
    assert "decoding" in r.stderr and f"{STEPS}/{STEPS}" in r.stderr  # tqdm's bar over the steps
    assert "seed 0" in r.stderr


@pytest.mark.slow
def test_muse_help_lists_every_subcommand_and_python_dash_m_muse_is_the_same():
    listed = run_muse(["--help"]).stdout
    for name in ("generate", "img2img", "inpaint", "evaluate", "shapes-eval", "convert", "train", "train-default"):
        assert f"    {name}" in listed, (name, listed)
    alias = subprocess.run([sys.executable, "-m", "muse", "--help"], capture_output=True, text=True, timeout=300)
    assert alias.returncode == 0 and alias.stdout.replace("python -m muse", "muse") == listed


@pytest.mark.slow
def test_muse_generate_on_the_embedded_model_runs_offline_without_the_training_code(tmp_path):
    """No --model: the embedded model, no network (HF_HUB_OFFLINE), and `train` is never imported."""
    out = tmp_path / "red.png"
    probe = (
        "import sys; from muse.cli import main; "
        f"code = main(['generate', 'a red circle on a blue background', '--seed', '0', '--steps', '2', '--out', {str(out)!r}]); "
        "print('TRAIN_MODULES', sorted(m for m in sys.modules if m == 'train' or m.startswith('train.'))); sys.exit(code)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TRAIN_MODULES []" in r.stdout, r.stdout
    width, height = PIL.Image.open(out).size
    assert width == height >= 64
