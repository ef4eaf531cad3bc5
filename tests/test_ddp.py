"""Data parallel: `torchrun --nproc_per_node 2 -m train` (gloo on CPU) trains the same weights as `python -m train` in
one process with the same global batch, through the command line and a published folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import muse_main

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], launcher: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        launcher + ["-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one_with_the_same_global_batch(tmp_path, published_dirs):
    threads = torch.get_num_threads()
    images = tmp_path / "img"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a red cube", "a blue ball", "green grass", "yellow sun", "a grey cat", "pink sky"]):
        Image.fromarray(rng.integers(0, 256, (32 + 8 * (i % 2), 32, 3), dtype=np.uint8)).save(images / f"{name}.png")
    common = [
        "--pretrained_model_name_or_path",
        str(published_dirs("tiny-256")),
        "--instance_data_dir",
        str(images),
        "--resolution",
        "32",
        "--max_train_steps",
        "3",
        "--gradient_accumulation_steps",
        "2",
        "--learning_rate",
        "1e-3",
        "--cond_dropout_prob",
        "0.3",
        "--max_grad_norm",
        "1.0",
        "--seed",
        "0",
        "--checkpointing_steps",
        "100",
        "--device",
        "cpu",
    ]
    torch.set_num_threads(1)
    try:
        # the one-process run in this process, through the console script's entry point (saves an interpreter start)
        assert muse_main(["train", *common, "--train_batch_size", "4", "--output_dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    run(common + ["--train_batch_size", "2", "--output_dir", str(tmp_path / "two")], torchrun)

    weights = "transformer/diffusion_pytorch_model.safetensors"
    one, two = load_file(str(tmp_path / "one" / weights)), load_file(str(tmp_path / "two" / weights))
    base = load_file(str(published_dirs("tiny-256") / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert sorted(one) == sorted(two)
    moved = max(float((one[k] - base[k]).abs().max()) for k in one)
    assert moved > 1e-3  # training changed the weights
    # Same masks, crops, dropout and data order on both sides; only the gradient sums differ in order (the
    # all-reduce adds two half-batch gradients), so after 3 Adam steps of lr 1e-3 the weights agree to ~1e-6.
    diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"weights moved by up to {moved:.3g}; one vs two processes differ by up to {diff:.3g}")
    assert diff < 2e-5, diff
    # the logged mean loss (over the processes) agrees too
    loss_one, loss_two = (_loss((tmp_path / run / "logs/train.log").read_text()) for run in ("one", "two"))
    assert abs(loss_one - loss_two) < 1e-4, (loss_one, loss_two)


def _loss(log: str) -> float:
    line = [row for row in log.splitlines() if " loss=" in row][-1]
    return float(line.split(" loss=")[1].split()[0])
