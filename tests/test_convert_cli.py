"""`muse convert` (and its alias `python -m convert`): converts, reports, and writes DST only when the whole conversion
succeeded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convert
from tests.helpers import muse_main, run_muse

REPO = Path(__file__).resolve().parents[1]


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_published_to_ours_prints_a_summary(published_dirs, tmp_path, capsys):
    dst = tmp_path / "ours"
    assert muse_main(["convert", str(published_dirs("tiny-256")), str(dst)]) == 0
    out = capsys.readouterr().out
    ours = convert.load_components(str(dst))
    params = ours.num_parameters()
    assert json.loads((dst / "muse.json").read_text())["parameters"] == params
    for name, n in params.items():
        assert f"{n:,}" in out and name in out
    assert "float32" in out and "transformer/model.safetensors" in out and "files written (10," in out
    assert _siblings(dst) == ["ours"]  # no temporary folder left beside it


@pytest.mark.slow
def test_fp16_variant_to_diffusers_writes_variant_files(published_dirs, tmp_path, capsys):
    dst = tmp_path / "diffusers16"
    assert (
        muse_main(["convert", str(published_dirs("tiny-512")), str(dst), "--to", "diffusers", "--variant", "fp16"]) == 0
    )
    assert "float16" in capsys.readouterr().out
    assert (dst / "transformer" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (dst / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    c = convert.load_components(str(dst), dtype=torch.float16, variant="fp16")
    assert set(c.dtypes().values()) == {torch.float16}


def test_dtype_flag_sets_the_written_precision(published_dirs, tmp_path):
    dst = tmp_path / "bf16"
    assert muse_main(["convert", str(published_dirs("tiny-256")), str(dst), "--dtype", "bfloat16"]) == 0
    c = convert.load_components(str(dst), dtype=None)
    index = json.loads((dst / "muse.json").read_text())
    assert set(index["dtype"].values()) == {"bfloat16"}
    assert c.transformer.dtype == torch.float32  # load_components' default dtype is float32


def test_failed_conversion_leaves_no_dst(published_dirs, tmp_path, capsys):
    src = tmp_path / "broken"
    shutil.copytree(published_dirs("tiny-256"), src, ignore=shutil.ignore_patterns("*.fp16.*"))
    weights = src / "text_encoder" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    dst = tmp_path / "out" / "ours"
    assert muse_main(["convert", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert f"{weights}: truncated safetensors file" in err and "was not written" in err
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_existing_dst_needs_overwrite_and_is_replaced_whole(published_dirs, tmp_path, capsys):
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    assert muse_main(["convert", str(published_dirs("tiny-256")), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err and (dst / "keep.txt").exists()
    assert muse_main(["convert", str(published_dirs("tiny-256")), str(dst), "--overwrite"]) == 0
    assert (dst / "muse.json").is_file() and not (dst / "keep.txt").exists()
    assert _siblings(dst) == ["ours"]


def test_failed_overwrite_keeps_the_old_dst(tmp_path, capsys):
    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    assert muse_main(["convert", str(tmp_path / "missing-src" / "x"), str(dst), "--overwrite"]) == 1
    assert (dst / "keep.txt").read_text() == "old"


@pytest.mark.slow
def test_the_muse_console_script_converts(published_dirs, tmp_path):
    dst = tmp_path / "ours"
    proc = run_muse(["convert", str(published_dirs("tiny-256")), str(dst)], cwd=tmp_path)
    assert "converted" in proc.stdout and (dst / "muse.json").is_file()


@pytest.mark.slow
def test_python_dash_m_convert_runs(published_dirs, tmp_path):
    dst = tmp_path / "ours"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "convert", str(published_dirs("tiny-256")), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stdout and "files written" in proc.stdout
    assert "loading transformer" in proc.stderr  # the progress bar
    assert (dst / "muse.json").is_file()
