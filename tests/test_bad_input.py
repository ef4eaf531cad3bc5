"""Bad or careless input, as a careless or hostile user gives it: each case ends in a clear error that names the
problem (the exit code and the one line `error: ...` for the commands), and nothing is written or lost (the old
output is intact, no partial file remains). Tiny models only; each case takes seconds.

Sections: `python -m train` (data, flags, output folder, device); resuming (mismatched settings refused, a changed
learning rate allowed and training the same tensors); `python -m convert` and loading (tensor dtypes, non-finite
weights, config field types, SRC = DST, killed conversions); the pipeline (non-finite sampling options, non-finite
logits, image ranges); writing files (atomic PNG and final weights, a full disk)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_loop import config, make_images, tiny_components

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

REPO = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> content): to show that nothing was written or lost."""
    if not path.exists():
        return {}
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tokenizer():
    from convert.clip_tokenizer import offline_clip_tokenizer

    return offline_clip_tokenizer()


# --- python -m train: one line, exit code 2, nothing written ------------------------------------------------------------


def _images(tmp: Path) -> Path:
    return make_images(tmp / "img", prompts=["a red cube", "a blue ball"])


def _folder_with(tmp: Path, name: str, content: str) -> Path:
    folder = _images(tmp)
    (folder / name).write_text(content)
    return folder


def _base_folder(tmp: Path) -> Path:
    base = tmp / "base"
    base.mkdir(exist_ok=True)
    (base / "model_index.json").write_text("{}")
    return base


def _empty(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _corrupt(tmp: Path) -> Path:
    folder = tmp / "corrupt"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _a_file(tmp: Path) -> Path:
    (tmp / "out").write_text("keep me")
    return tmp / "out"


# case -> (extra flags built from tmp, message substring); every case: exit 2, one line, nothing written
TRAIN_CASES = {
    "zero steps": (
        lambda t: ["--instance_data_dir", str(_images(t)), "--max_train_steps", "0"],
        "max_train_steps must be >= 1, got 0",
    ),
    "no step count": (lambda t: ["--instance_data_dir", str(_images(t))], "--max_train_steps is required"),
    "no data source": (lambda t: ["--max_train_steps", "1"], "give exactly one of --instance_data_dir"),
    "two data sources": (
        lambda t: ["--instance_data_dir", str(_images(t)), "--instance_data_image", "x.png", "--max_train_steps", "1"],
        "give exactly one of",
    ),
    "data folder missing": (
        lambda t: ["--instance_data_dir", str(t / "nowhere"), "--max_train_steps", "1"],
        "is not a folder",
    ),
    "empty data folder": (
        lambda t: ["--instance_data_dir", str(_empty(t)), "--max_train_steps", "1"],
        "no image files",
    ),
    "all images corrupt": (
        lambda t: ["--instance_data_dir", str(_corrupt(t)), "--max_train_steps", "1"],
        "none of the 2 images",
    ),
    "output_dir is a file": (
        lambda t: ["--instance_data_dir", str(_images(t)), "--max_train_steps", "1", "--output_dir", str(_a_file(t))],
        "is a file, not a folder",
    ),
    "output_dir under a file": (
        lambda t: [
            "--instance_data_dir",
            str(_images(t)),
            "--max_train_steps",
            "1",
            "--output_dir",
            str(_a_file(t) / "run"),
        ],
        "is a file",
    ),
    "output_dir is the base model": (
        lambda t: [
            "--instance_data_dir",
            str(_images(t)),
            "--max_train_steps",
            "1",
            "--pretrained_model_name_or_path",
            str(_base_folder(t)),
            "--output_dir",
            str(_base_folder(t)),
        ],
        "is the base model's folder",
    ),
    "output_dir inside the base model": (
        lambda t: [
            "--instance_data_dir",
            str(_images(t)),
            "--max_train_steps",
            "1",
            "--pretrained_model_name_or_path",
            str(_base_folder(t)),
            "--output_dir",
            str(_base_folder(t) / "lora"),
        ],
        "is inside the base model's folder",
    ),
    "metadata line not JSON": (
        lambda t: [
            "--instance_data_dir",
            str(
                _folder_with(
                    t, "metadata.jsonl", '{"file_name": "a red cube.png", "text": "x"}\n{"file_name": "a blue\n'
                )
            ),
            "--max_train_steps",
            "1",
        ],
        "metadata.jsonl:2: not valid JSON",
    ),
    "metadata row names no image": (
        lambda t: [
            "--instance_data_dir",
            str(
                _folder_with(
                    t,
                    "metadata.jsonl",
                    '{"file_name": "a red cube.png", "text": "x"}\n{"file_name": "nope.png", "text": "y"}\n',
                )
            ),
            "--max_train_steps",
            "1",
        ],
        "metadata.jsonl:2: file_name 'nope.png' matches no image",
    ),
    "metadata caption null": (
        lambda t: [
            "--instance_data_dir",
            str(_folder_with(t, "metadata.jsonl", '{"file_name": "a red cube.png", "text": null}\n')),
            "--max_train_steps",
            "1",
        ],
        "metadata.jsonl:1: the caption 'text' must be a string, got None",
    ),
    "metadata caption a number": (
        lambda t: [
            "--instance_data_dir",
            str(_folder_with(t, "metadata.jsonl", '{"file_name": "a red cube.png", "text": 7}\n')),
            "--max_train_steps",
            "1",
        ],
        "must be a string, got 7",
    ),
    "metadata twice for one image": (
        lambda t: [
            "--instance_data_dir",
            str(
                _folder_with(
                    t,
                    "metadata.jsonl",
                    '{"file_name": "a red cube.png", "text": "a"}\n{"file_name": "a red cube.png", "text": "b"}\n',
                )
            ),
            "--max_train_steps",
            "1",
        ],
        "metadata.jsonl:2: a second row for 'a red cube.png' (the first is on line 1)",
    ),
    "csv unterminated quote": (
        lambda t: [
            "--instance_data_dir",
            str(_folder_with(t, "metadata.csv", 'file_name,text\n"a red cube.png,a cube\na blue ball.png,a ball\n')),
            "--max_train_steps",
            "1",
        ],
        "metadata.csv:2: cannot parse the CSV row",
    ),
    "csv row with a missing field": (
        lambda t: [
            "--instance_data_dir",
            str(_folder_with(t, "metadata.csv", "file_name,text\na red cube.png\n")),
            "--max_train_steps",
            "1",
        ],
        "metadata.csv:2: 1 field(s), the header has 2",
    ),
    "metadata file missing": (
        lambda t: [
            "--instance_data_dir",
            str(_images(t)),
            "--instance_data_metadata",
            str(t / "captions.jsonl"),
            "--max_train_steps",
            "1",
        ],
        "captions.jsonl does not exist",
    ),
    "learning rate nan": (
        lambda t: ["--instance_data_dir", str(_images(t)), "--max_train_steps", "1", "--learning_rate", "nan"],
        "learning_rate must be a finite number, got nan",
    ),
    "masking schedule unknown": (
        lambda t: ["--instance_data_dir", str(_images(t)), "--max_train_steps", "1", "--masking_schedule", "square"],
        "masking_schedule: unknown masking schedule 'square'",
    ),
    "lora alpha inf": (
        lambda t: [
            "--instance_data_dir",
            str(_images(t)),
            "--max_train_steps",
            "1",
            "--use_lora",
            "--lora_alpha",
            "inf",
        ],
        "lora_alpha must be a finite number",
    ),
    "lora rank zero": (
        lambda t: ["--instance_data_dir", str(_images(t)), "--max_train_steps", "1", "--use_lora", "--lora_r", "0"],
        "lora_r must be >= 1, got 0",
    ),
    "device not a device": (
        lambda t: ["--instance_data_dir", str(_images(t)), "--max_train_steps", "1", "--device", "gpu"],
        "--device 'gpu' is not a device",
    ),
    "base model missing": (
        lambda t: [
            "--instance_data_dir",
            str(_images(t)),
            "--max_train_steps",
            "1",
            "--pretrained_model_name_or_path",
            str(t / "no" / "model"),
        ],
        "no such folder",
    ),
}
if not torch.cuda.is_available():
    TRAIN_CASES["device cuda without a GPU"] = (
        lambda t: ["--instance_data_dir", str(_images(t)), "--max_train_steps", "1", "--device", "cuda"],
        "--device cuda: no CUDA GPU is available",
    )


def run_train(argv: list[str], capsys) -> tuple[int, str]:
    from train.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_bad_input_in_one_line(case, tmp_path, capsys):
    build, message = TRAIN_CASES[case]
    extra = build(tmp_path)
    argv = [
        "--pretrained_model_name_or_path",
        str(tmp_path / "unused-model"),
        "--output_dir",
        str(tmp_path / "run"),
        *extra,
    ]
    before = {p.name: tree(p) for p in tmp_path.iterdir()}
    code, err = run_train(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert {p.name: tree(p) for p in tmp_path.iterdir() if p.name in before} == before  # nothing lost or changed
    new = [p.name for p in tmp_path.iterdir() if p.name not in before]
    assert new == [] or (case == "base model missing" and new == ["run"]), new  # nothing written (but the run's log)


def test_train_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    from train.cli import main

    argv = [
        "--pretrained_model_name_or_path",
        "x",
        "--instance_data_dir",
        str(_images(tmp_path)),
        "--max_train_steps",
        "0",
    ]
    with pytest.raises(ValueError, match="max_train_steps must be >= 1"):
        main(argv + ["--debug"])
    monkeypatch.setenv("MUSE_DEBUG", "1")
    with pytest.raises(ValueError, match="max_train_steps must be >= 1"):
        main(argv)


@pytest.mark.slow
def test_python_dash_m_train_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MUSE_DEBUG", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--pretrained_model_name_or_path",
            "x",
            "--max_train_steps",
            "1",
            "--output_dir",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: give exactly one of --instance_data_dir, --instance_data_image, --instance_data_dataset (got none)"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_train_refuses_a_read_only_output_dir(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, err = run_train(
            [
                "--pretrained_model_name_or_path",
                "x",
                "--instance_data_dir",
                str(_images(tmp_path)),
                "--max_train_steps",
                "1",
                "--output_dir",
                str(out),
            ],
            capsys,
        )
    finally:
        out.chmod(0o755)
    assert code == 2 and "--output_dir: cannot write into" in err and list(out.iterdir()) == []


def test_skipping_bad_metadata_rows_is_explicit_and_counted(tmp_path):
    from train.data import ImageFolderSource

    folder = _folder_with(
        tmp_path,
        "metadata.jsonl",
        "\n".join(
            [
                '{"file_name": "a red cube.png", "text": "a cube"}',
                '{"file_name": "gone.png", "text": "x"}',
                "not json",
                '{"file_name": "a blue ball.png", "text": null}',
            ]
        )
        + "\n",
    )
    src = ImageFolderSource(folder, skip_invalid_metadata=True)
    assert len(src.metadata_skipped) == 3
    assert [s.split(": ")[0].rsplit(":", 1)[1] for s in src.metadata_skipped] == ["2", "3", "4"]  # the line numbers
    assert "3 metadata rows skipped" in src.describe()
    assert {src.prompt(i) for i in range(len(src))} == {"a cube", "a blue ball"}  # the null row fell back to the name


# --- resuming ------------------------------------------------------------------------------------------------------------


LORA = dict(use_lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-3, checkpointing_steps=1)

# a changed setting that shapes the saved state -> what the error lists
MISMATCHES = {
    "LoRA rank": (dict(lora_r=8), "lora_r: 4 -> 8"),
    "LoRA alpha": (dict(lora_alpha=16), "lora_alpha: 8 -> 16"),
    "LoRA targets": (dict(lora_target_modules=["to_q"]), "lora_target_modules: ['to_q', 'to_k', 'to_v'] -> ['to_q']"),
    "full instead of LoRA": (dict(use_lora=False), "use_lora: True -> False"),
    "8-bit Adam": (dict(use_8bit_adam=True), "use_8bit_adam: False -> True"),
    "mixed precision (grad scaler)": (dict(mixed_precision="fp16"), "mixed_precision: 'no' -> 'fp16'"),
    "EMA": (dict(use_ema=True), "use_ema: False -> True"),
    "text encoder LoRA": (
        dict(train_text_encoder=True, text_encoder_use_lora=True),
        "train_text_encoder: False -> True",
    ),
    "two at once": (dict(lora_r=2, use_ema=True), "lora_r: 4 -> 2; use_ema: False -> True"),
}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    """A rank-4 LoRA run of 2 steps, a checkpoint after each."""
    from train.loop import train

    tmp = tmp_path_factory.mktemp("lora-run")
    images = make_images(tmp / "img")
    train(config(tmp, images, max_train_steps=2, **LORA), tiny_components(tokenizer))
    return tmp, images


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_resume_with_settings_that_shape_the_state_is_refused(case, lora_run, tokenizer, tmp_path):
    from train.loop import train

    run, images = lora_run
    work = tmp_path / "copy"
    shutil.copytree(run / "out", work / "out")
    before = tree(work / "out")
    changed, listed = MISMATCHES[case]
    cfg = config(work, images, max_train_steps=4, resume_from_checkpoint="latest", **{**LORA, **changed})
    with pytest.raises(ValueError, match="cannot resume .*checkpoint-2 with different settings") as info:
        train(cfg, tiny_components(tokenizer))
    assert listed in str(info.value)
    after = tree(work / "out")
    assert {k: v for k, v in after.items() if not k.startswith("logs")} == {
        k: v for k, v in before.items() if not k.startswith("logs")
    }


def test_resume_with_another_base_model_is_refused(lora_run, tokenizer, tmp_path):
    from train.loop import train
    from uvit import UViT, UViTConfig

    run, images = lora_run
    shutil.copytree(run / "out", tmp_path / "out")
    components = tiny_components(tokenizer)
    components.transformer = UViT(UViTConfig.tiny(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"the base model's U-ViT differs \(num_hidden_layers 2 -> 3\)"):
        train(config(tmp_path, images, max_train_steps=4, resume_from_checkpoint="latest", **LORA), components)


@pytest.mark.slow
def test_resume_mismatch_from_the_command_line_is_one_line(published_dirs, tmp_path, capsys):
    base = str(published_dirs("tiny-256"))
    images = _images(tmp_path)
    common = [
        "--pretrained_model_name_or_path",
        base,
        "--instance_data_dir",
        str(images),
        "--resolution",
        "32",
        "--train_batch_size",
        "1",
        "--output_dir",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--use_lora",
        "--lora_r",
        "4",
        "--checkpointing_steps",
        "1",
    ]
    assert run_train(common + ["--max_train_steps", "1"], capsys)[0] == 0
    saved = tree(tmp_path / "run" / "checkpoint-1")
    code, err = run_train(
        common + ["--max_train_steps", "2", "--resume_from", "latest", "--lora_r", "8", "--use_8bit_adam"], capsys
    )
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: cannot resume") and "lora_r: 4 -> 8; use_8bit_adam: False -> True" in line
    assert tree(tmp_path / "run" / "checkpoint-1") == saved and not (tmp_path / "run" / "checkpoint-2").exists()


def test_resume_with_a_new_learning_rate_keeps_training_the_same_tensors(lora_run, tokenizer, tmp_path):
    """The fix of the silent no-op resume: the resumed run (learning rate changed, allowed with a warning) steps
    the adapters it saves: they change between checkpoints, and the final file holds the last checkpoint's."""
    from train.loop import train

    run, images = lora_run
    shutil.copytree(run / "out", tmp_path / "out")
    train(
        config(tmp_path, images, max_train_steps=4, resume_from_checkpoint="latest", **{**LORA, "learning_rate": 5e-3}),
        tiny_components(tokenizer),
    )
    out = tmp_path / "out"
    saved = {step: load_file(str(out / f"checkpoint-{step}" / "model.safetensors")) for step in (2, 3, 4)}
    assert saved[2].keys() == saved[3].keys() == saved[4].keys()
    assert all(v.shape[0] == 4 or v.shape[1] == 4 for v in saved[4].values())  # still rank 4
    for a, b in ((2, 3), (3, 4)):
        assert any(not torch.equal(saved[a][k], saved[b][k]) for k in saved[a]), f"checkpoint-{b} equals checkpoint-{a}"
    final = load_file(str(out / "lora.safetensors"))
    assert final.keys() == saved[4].keys() and all(torch.equal(final[k], v) for k, v in saved[4].items())
    log = (out / "logs" / "train.log").read_text()
    assert "changed setting: learning_rate: 0.001 -> 0.005" in log
    state = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert {g["lr"] for g in state["param_groups"]} == {5e-3}


def test_resumed_optimizer_uses_this_runs_betas(lora_run, tokenizer, tmp_path):
    from train.loop import train

    run, images = lora_run
    shutil.copytree(run / "out", tmp_path / "out")
    train(
        config(tmp_path, images, max_train_steps=3, resume_from_checkpoint="latest", adam_beta2=0.9, **LORA),
        tiny_components(tokenizer),
    )
    state = torch.load(tmp_path / "out" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {tuple(g["betas"]) for g in state["param_groups"]} == {(0.9, 0.9)}


# --- python -m convert and loading ---------------------------------------------------------------------------------------


@pytest.fixture
def published(published_dirs, tmp_path) -> Path:
    dst = tmp_path / "pipe"
    shutil.copytree(published_dirs("tiny-256"), dst)
    return dst


def _relabel_dtype(path: Path, old: str, new: str) -> str:
    """Change the dtype tag of the file's first `old` tensor to `new` in its header, as a hand edit of the header
    would (the data bytes stay); returns the tensor's name."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == old)
    header[name]["dtype"] = new
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return name


def _poison_first_tensor(path: Path, value: float) -> str:
    """Write `value` into the first element of the file's first F32 tensor; returns its name."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name, info = next((k, v) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    at = 8 + n + info["data_offsets"][0]
    data[at : at + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(data))
    return name


def _config_field(value):
    def edit(folder: Path) -> None:
        path = folder / "transformer" / "config.json"
        cfg = json.loads(path.read_text())
        cfg["num_hidden_layers"] = value
        path.write_text(json.dumps(cfg))

    return edit


CONVERT_CASES = {
    "F32 header rewritten as I32": (
        lambda f: _relabel_dtype(f / "transformer" / "diffusion_pytorch_model.safetensors", "F32", "I32"),
        [],
        "stored as int32, not a float type",
    ),
    "text encoder F32 as I32": (
        lambda f: _relabel_dtype(f / "text_encoder" / "model.safetensors", "F32", "I32"),
        [],
        "model.safetensors: 1 tensor(s) cannot be weights",
    ),
    "NaN weight": (
        lambda f: _poison_first_tensor(f / "vqvae" / "diffusion_pytorch_model.safetensors", math.nan),
        [],
        "values are NaN or infinite",
    ),
    "inf weight": (
        lambda f: _poison_first_tensor(f / "transformer" / "diffusion_pytorch_model.safetensors", math.inf),
        [],
        "values are NaN or infinite",
    ),
    "fp16 variant holding bfloat16": (
        lambda f: _relabel_dtype(f / "transformer" / "diffusion_pytorch_model.fp16.safetensors", "F16", "BF16"),
        ["--variant", "fp16"],
        "declared float16, but 1 float tensor(s) are stored otherwise",
    ),
    "config field a string": (_config_field("four"), [], "num_hidden_layers must be an integer, got 'four'"),
    "config field zero": (_config_field(0), [], "num_hidden_layers must be >= 1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CONVERT_CASES))
def test_convert_refuses_bad_weights_and_configs(case, published, tmp_path, capsys):
    from convert.__main__ import main

    edit, flags, message = CONVERT_CASES[case]
    edit(published)
    dst = tmp_path / "out" / "ours"
    code = main([str(published), str(dst), *flags])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "was not written" in err, err
    assert not dst.exists() and (not dst.parent.exists() or list(dst.parent.iterdir()) == [])


def test_weights_with_a_rewritten_dtype_do_not_load_into_a_pipeline(published):
    from muse import Pipeline

    _relabel_dtype(published / "transformer" / "diffusion_pytorch_model.safetensors", "F32", "I32")
    with pytest.raises(ValueError, match="not a float type"):
        Pipeline.from_pretrained(str(published))


def test_convert_refuses_to_write_over_its_source(published, capsys):
    from convert.__main__ import main

    before = tree(published)
    for dst, message in (
        (published, "is SRC"),
        (published / "transformer", "is inside SRC"),
        (published.parent, "holds SRC"),
    ):
        assert main([str(published), str(dst), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: DST") and message in err[0]
    assert tree(published) == before


def test_a_killed_conversions_leftovers_are_cleaned_by_the_next(published, tmp_path, capsys):
    from convert.__main__ import main

    dst = tmp_path / "ours"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [tmp_path / f".ours.{dead}.abcd1234.partial", tmp_path / ".ours.k2j4h5g6.partial"]  # with and without pid
    live = tmp_path / f".ours.{os.getpid()}.zzzz9999.partial"  # a conversion still running: left alone
    other = tmp_path / f".ours.v2.{dead}.abcd1234.partial"  # another destination's
    for d in (*stale, live, other):
        d.mkdir()
        (d / "muse.json").write_text("{}")
    assert main([str(published), str(dst)]) == 0
    capsys.readouterr()
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dst.name, live.name, other.name, "pipe"])


def test_a_dst_moved_aside_by_a_killed_conversion_is_put_back(published, tmp_path, capsys):
    from convert.__main__ import main

    dst = tmp_path / "ours"
    aside = tmp_path / f".ours.old-{2**22 + 12345}"
    aside.mkdir()
    (aside / "keep.txt").write_text("the old DST")
    assert main([str(published), str(dst)]) == 2  # it is back, so it exists and needs --overwrite
    assert "already exists" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "the old DST" and not aside.exists()


def test_sampling_defaults_of_the_wrong_type_name_the_model(published, tmp_path):
    from convert.__main__ import main
    from muse import Pipeline

    ours = tmp_path / "ours"
    assert main([str(published), str(ours)]) == 0
    path = ours / "scheduler" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sampling_defaults": {"guidance_scale": "high"}}))
    with pytest.raises(
        ValueError,
        match=rf"{ours}: its scheduler config's sampling_defaults are invalid: guidance_scale must be a number, got 'high'",
    ):
        Pipeline.from_pretrained(str(ours))


# --- the pipeline: finite options, finite logits, pixel ranges -----------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(published_dirs):
    from muse import Pipeline

    return Pipeline.from_pretrained(str(published_dirs("tiny-256")))


def picture(size: int = 32) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


NAN, INF = float("nan"), float("inf")
OPTION_CASES = {
    "temperature nan": (dict(temperature=NAN), "temperature must be finite, got nan"),
    "temperature inf,0": (dict(temperature=(INF, 0)), r"temperature must be finite, got \(inf, 0\)"),
    "temperature three values": (dict(temperature=(1, 2, 3)), "a number or a \\(start, end\\) pair"),
    "temperature a string": (dict(temperature="hot"), "temperature must be a number, got 'hot'"),
    "guidance nan": (dict(guidance_scale=NAN), "guidance_scale must be finite, got nan"),
    "guidance inf": (dict(guidance_scale=INF), "guidance_scale must be finite, got inf"),
    "guidance a string": (dict(guidance_scale="high"), "guidance_scale must be a number, got 'high'"),
    "aesthetic score nan": (
        dict(micro_conditioning_aesthetic_score=NAN),
        "micro_conditioning_aesthetic_score must be finite",
    ),
    "crop nan": (dict(micro_conditioning_crop_coord=(NAN, 0)), "micro_conditioning_crop_coord must be finite"),
    "sampling temperature inf": (dict(sampling_temperature=INF), "sampling_temperature must be finite"),
    "steps a bool": (dict(num_inference_steps=True), "num_inference_steps must be an integer >= 1, got True"),
    "prompt embeddings NaN": (
        dict(prompt=None, prompt_embeds=torch.full((1, 32), NAN), encoder_hidden_states=torch.zeros(1, 77, 32)),
        "prompt_embeds holds NaN or infinite values",
    ),
    "negative hidden states inf": (
        dict(negative_prompt_embeds=torch.zeros(1, 32), negative_encoder_hidden_states=torch.full((1, 77, 32), INF)),
        "negative_encoder_hidden_states holds NaN or infinite",
    ),
    "height zero": (dict(height=0), "height must be a positive number of pixels, got 0"),
    "width negative": (dict(width=-32), "width must be a positive number of pixels, got -32"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_non_finite_or_mistyped_options_are_refused(case, pipe):
    args, message = OPTION_CASES[case]
    args = {"prompt": "a cat", "num_inference_steps": 2, **args}
    with pytest.raises(ValueError, match=message):
        pipe(progress_bar=False, **args)


def test_non_finite_sampling_defaults_are_refused_at_construction(pipe):
    from muse import Pipeline

    with pytest.raises(ValueError, match="sampling_defaults are invalid: temperature must be finite"):
        Pipeline(
            pipe.transformer, pipe.vqvae, pipe.text_encoder, pipe.tokenizer, sampling_defaults={"temperature": [NAN, 0]}
        )


def test_non_finite_logits_raise_and_name_the_likely_cause(pipe):
    from muse.pipeline import NonFiniteLogitsError

    weight = next(p for n, p in pipe.transformer.named_parameters() if p.dim() == 2 and "layers" in n)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(NAN)
    try:
        with pytest.raises(
            NonFiniteLogitsError, match="logits became NaN or infinite .*step 1 of 3.*weights or the inputs"
        ):
            pipe("a cat", num_inference_steps=3, progress_bar=False, generator=torch.Generator().manual_seed(0))
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_finite_logits_pass_unchanged(pipe):
    """The logits screen changes nothing for a healthy model: same seed, same image as before it existed would give
    (checked here as: same tokens twice, and every token a code)."""
    out = [
        pipe(
            "a cat",
            num_inference_steps=3,
            output_type="latent",
            progress_bar=False,
            generator=torch.Generator().manual_seed(1),
        )
        for _ in range(2)
    ]
    assert torch.equal(out[0], out[1]) and int(out[0].max()) < pipe.transformer.config.codebook_size


PIXEL_CASES = {
    "0-255 floats": (
        lambda: np.asarray(picture(), np.float32),
        r"floats in \[0, 1\], got values in \[\d+, \d+\] \(0-255 values\? divide by 255",
    ),
    "negative floats": (lambda: np.asarray(picture(), np.float32) / 255 - 0.5, r"got values in \[-0.5"),
    "NaN pixels": (lambda: np.full((32, 32, 3), NAN, np.float32), "holds NaN or infinite values"),
    "float tensor above 1": (lambda: torch.full((3, 32, 32), 1.5), r"got values in \[1.5, 1.5\]"),
    "int32 array": (lambda: np.zeros((32, 32, 3), np.int32), r"floats in \[0, 1\] or uint8 in \[0, 255\]"),
}


@pytest.mark.parametrize("method", ["img2img", "inpaint"])
@pytest.mark.parametrize("case", list(PIXEL_CASES))
def test_pixels_outside_the_unit_range_are_refused(case, method, pipe):
    image, message = PIXEL_CASES[case]
    extra = {"mask_image": np.ones((32, 32), np.float32)} if method == "inpaint" else {}
    with pytest.raises(ValueError, match=message):
        getattr(pipe, method)("a cat", image(), num_inference_steps=2, progress_bar=False, **extra)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.full((32, 32), 255.0, np.float32), r"mask values must be floats in \[0, 1\], got values in \[255, 255\]"),
        (np.full((32, 32), NAN, np.float32), "mask values must be floats in"),
    ],
)
def test_masks_outside_the_unit_range_are_refused(mask, message, pipe):
    with pytest.raises(ValueError, match=message):
        pipe.inpaint("a cat", picture(), mask, num_inference_steps=2, progress_bar=False)


def test_uint8_arrays_are_read_as_0_to_255(pipe):
    as_uint8 = np.array(picture())

    def run(image, mask):
        return pipe.inpaint(
            "a cat",
            image,
            mask,
            num_inference_steps=2,
            output_type="latent",
            progress_bar=False,
            generator=torch.Generator().manual_seed(0),
        )

    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    assert torch.equal(run(as_uint8, mask), run(as_uint8.astype(np.float32) / 255, (mask / 255).astype(np.float32)))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n truncated", "cannot read the image"),
        (b"just some text", "cannot read the image"),
    ],
)
def test_unreadable_image_files_name_the_file(content, message, tmp_path):
    from muse.images import load_image

    path = tmp_path / "in.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_image(path)


def test_truncated_image_file_names_the_file(tmp_path):
    from muse.images import load_image

    path = tmp_path / "in.png"
    picture(64).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{path}: cannot read the image"):
        load_image(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    from muse.images import load_image

    path = tmp_path / "big.png"
    picture(64).save(path)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 pixels: a "bomb" at this limit
    with pytest.raises(ValueError, match=f"{path}: refused to decode"):
        load_image(path)


@pytest.mark.parametrize("command", ["img2img", "inpaint-image", "inpaint-mask"])
def test_muse_refuses_an_unreadable_image_in_one_line(command, tmp_path, capsys):
    """Read before the model loads: one line naming the file, exit 2, no output written."""
    from muse.cli import main

    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    picture().save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    out = tmp_path / "out.png"
    if command == "img2img":
        argv = ["img2img", "a cat", "--image", str(bad)]
    else:
        image, mask = (bad, good) if command == "inpaint-image" else (good, bad)
        argv = ["inpaint", "a cat", "--image", str(image), "--mask", str(mask)]
    assert main(argv + ["--out", str(out), "--model", str(tmp_path / "no-model")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"error: {bad}: cannot read the image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.png", "good.png"]


# --- muse generate / img2img / inpaint: checked before the model loads ------------------------------------------------

CLI_CASES = [
    # (arguments after the prompt, a piece of the one-line message)
    (["--guidance-scale", "nan"], "expected a finite number, got 'nan'"),
    (["--guidance-scale", "inf"], "expected a finite number, got 'inf'"),
    (["--temperature", "nan"], "of finite numbers, got 'nan'"),
    (["--temperature", "inf,0"], "of finite numbers, got 'inf,0'"),
    (["--height", "0"], "expected an integer >= 1, got '0'"),
    (["--steps", "0"], "expected an integer >= 1, got '0'"),
    (["--num-images", "-2"], "expected an integer >= 1"),
    (["--seed", "-1"], "a seed is an integer in [0, 2**63), got -1"),
    (["--seed", str(2**64 - 1)], "a seed is an integer in [0, 2**63)"),
    (["--seed", str(2**63 - 1), "--num-images", "2"], "runs past the largest seed"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "gpu"], "--device 'gpu' is not a device"),
]


@pytest.mark.parametrize("extra, message", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_muse_generate_refuses_bad_options_in_one_line(extra, message, tmp_path, capsys):
    """argparse's errors (exit 2, usage + one line) or ours (one line): either way nothing loads or is written."""
    from muse.cli import main

    out = tmp_path / "out.png"
    try:
        code = main(["generate", "a cat", "--out", str(out), "--model", str(tmp_path / "no-model"), *extra])
    except SystemExit as e:  # argparse refuses a bad value before anything runs
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_an_unwritable_output_is_refused_before_the_model_loads(tmp_path, capsys):
    from muse.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("old")
    assert main(["generate", "a cat", "--out", str(blocker / "out.png"), "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0] and "no-model" not in err[0]  # refused before loading anything
    assert blocker.read_text() == "old"


def test_muse_debug_shows_the_traceback(tmp_path, monkeypatch):
    from muse.cli import main

    argv = ["generate", "a cat", "--out", str(tmp_path / "o.png"), "--model", str(tmp_path / "no-model")]
    with pytest.raises(ValueError):
        main(["--debug", *argv])
    monkeypatch.setenv("MUSE_DEBUG", "1")
    with pytest.raises(ValueError):
        main(argv)


@pytest.mark.parametrize(
    "content, message",
    [(b"not a safetensors file at all", "header"), (b"\x80\x04\x95 pickle", "header"), (None, "")],
    ids=["text", "pickle", "truncated"],
)
def test_load_lora_on_a_bad_file_names_the_path(content, message, pipe, tmp_path):
    from convert.lora import inject_lora, save_lora

    path = tmp_path / "lora.safetensors"
    if content is None:  # a real adapter file cut short
        adapted = type(pipe.transformer)(pipe.transformer.config)
        inject_lora(adapted, ["q"], rank=2, alpha=2)
        save_lora(adapted, path)
        path.write_bytes(path.read_bytes()[:-40])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        pipe.load_lora(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_load_lora_that_does_not_fit_names_the_path(pipe, tmp_path):
    from convert.lora import inject_lora, save_lora
    from uvit import UViT, UViTConfig

    wide = UViT(UViTConfig.tiny(hidden_size=96, num_attention_heads=4, intermediate_size=128))
    inject_lora(wide, ["q"], rank=2, alpha=2)
    path = save_lora(wide, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match=f"{path}: .*do not fit"):
        pipe.load_lora(path)


# --- writing files: whole or not at all -------------------------------------------------------------------------------


class FullDisk:
    """A stand-in for `open` whose files fail to write with ENOSPC once `room` bytes are written (a full disk)."""

    def __init__(self, room: int):
        self.room = room

    def __call__(self, path, mode="r", *args, **kwargs):
        return _FullFile(open(path, mode, *args, **kwargs), self.room)


class _FullFile:
    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_png_is_written_whole_or_the_old_one_stays(tmp_path, monkeypatch):
    from muse import files

    out = tmp_path / "out.png"
    files.save_png_atomic(picture(), out)
    old = out.read_bytes()
    assert PIL.Image.open(out).size == (32, 32)
    monkeypatch.setattr(files, "open", FullDisk(room=100), raising=False)
    with pytest.raises(OSError, match=f"no space left on device while writing {out}") as info:
        files.save_png_atomic(picture(64), out)
    assert info.value.errno == errno.ENOSPC
    assert out.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_torch_save_on_a_full_disk_says_so(tmp_path, monkeypatch):
    from muse import files

    monkeypatch.setattr(files, "open", FullDisk(room=300), raising=False)
    with pytest.raises(OSError, match="no space left on device while writing .*optimizer.pt"):
        files.save_torch({"x": torch.zeros(1000)}, tmp_path / "optimizer.pt")


def test_a_full_disk_during_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    """torch.save's own report of a full disk is "unexpected pos"; the command says what happened."""
    from muse import files
    from train import checkpoint, cli

    def train_until_the_disk_is_full(cfg):
        monkeypatch.setattr(files, "open", FullDisk(room=300), raising=False)
        checkpoint.save_torch({"state": torch.zeros(1000)}, checkpoint.begin(cfg.output_dir, 1) / "optimizer.pt")

    monkeypatch.setattr(cli, "train", train_until_the_disk_is_full)  # the command's training call
    code, err = run_train(
        [
            "--pretrained_model_name_or_path",
            "x",
            "--instance_data_dir",
            "x",
            "--max_train_steps",
            "1",
            "--output_dir",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert (
        lines[0].startswith(f"error: no space left on device while writing {tmp_path / 'run'}")
        and "optimizer.pt" in lines[0]
    )
    assert checkpoint.checkpoints(tmp_path / "run") == []  # no checkpoint claims to be complete


def test_the_safetensors_writers_full_disk_is_recognised(tmp_path):
    from muse import files

    error = files.write_error(
        Exception(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        ),
        tmp_path / "model.safetensors",
    )
    assert (
        error.errno == errno.ENOSPC
        and f"no space left on device while writing {tmp_path / 'model.safetensors'}" in str(error)
    )


def test_check_writable_before_slow_work(tmp_path):
    from muse import files

    assert files.check_writable(tmp_path / "new" / "deeper" / "a.png") == tmp_path / "new" / "deeper" / "a.png"
    assert (tmp_path / "new" / "deeper").is_dir() and list((tmp_path / "new" / "deeper").iterdir()) == []
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        files.check_writable(tmp_path / "folder.png")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file"):
        files.check_writable(tmp_path / "afile" / "a.png")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        files.check_writable(tmp_path / "afile", folder=True)


def test_final_weights_are_replaced_whole_or_kept(tmp_path, tokenizer, monkeypatch):
    """A failure while the final transformer/ folder is written (a full disk) keeps the previous one, whole."""
    from train import loop

    images = make_images(tmp_path / "img")
    loop.train(config(tmp_path, images, max_train_steps=1), tiny_components(tokenizer))
    out = tmp_path / "out"
    before = tree(out / "transformer")

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(loop, "save_file", full_disk)
    cfg = config(tmp_path, images, max_train_steps=1)
    with pytest.raises(OSError, match=f"no space left on device while writing {out / 'transformer'}"):
        loop.save_final(out, cfg, tiny_components(tokenizer).transformer, None)
    assert tree(out / "transformer") == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial folder left
