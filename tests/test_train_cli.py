"""`muse train` (alias `python -m train`) takes the reference script's flags and runs the published recipes end to end on a tiny published
folder (LoRA, checkpoints, validation images, wandb offline, the style recipe's resume), and
`python -m train.generate_images` generates from a base model plus the trained adapters."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import muse_main, run_muse
from train import checkpoint
from train.cli import config_from_args, parser

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

REPO = Path(__file__).resolve().parents[1]

# every option of the reference's fine-tuning script
REFERENCE_FLAGS = """
pretrained_model_name_or_path revision variant instance_data_dataset instance_data_dir instance_data_image
use_8bit_adam dataloader_num_workers allow_tf32 use_ema ema_decay ema_update_after_step adam_beta1 adam_beta2
adam_weight_decay adam_epsilon output_dir seed logging_dir max_train_steps checkpointing_steps logging_steps
checkpoints_total_limit resume_from_checkpoint train_batch_size gradient_accumulation_steps learning_rate scale_lr
lr_scheduler lr_warmup_steps validation_steps mixed_precision report_to validation_prompts resolution
split_vae_encode min_masking_rate cond_dropout_prob max_grad_norm use_lora text_encoder_use_lora lora_r lora_alpha
lora_target_modules text_encoder_lora_r text_encoder_lora_alpha text_encoder_lora_target_modules train_text_encoder
image_key prompt_key gradient_checkpointing prompt_prefix
""".split()


def test_every_reference_flag_is_accepted():
    options = {s for action in parser()._actions for s in action.option_strings}
    assert [f for f in REFERENCE_FLAGS if f"--{f}" not in options] == []
    assert "--resume_from" in options  # the published README's spelling of --resume_from_checkpoint


def test_recipe_flags_parse_into_the_config():
    cfg = config_from_args(
        "--pretrained_model_name_or_path amused/amused-512 --instance_data_dataset monadical-labs/minecraft-preview "
        "--prompt_prefix minecraft_ --image_key image --prompt_key text --resolution 512 --train_batch_size 1 "
        "--gradient_accumulation_steps 8 --mixed_precision fp16 --lr_scheduler constant --max_train_steps 10000 "
        "--checkpointing_steps 500 --validation_steps 250 --gradient_checkpointing --learning_rate 1e-4 --use_lora "
        "--use_8bit_adam --resume_from latest --validation_prompts a b".split()
    )
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.mixed_precision) == (1, 8, "fp16")
    assert cfg.use_lora and cfg.use_8bit_adam and cfg.gradient_checkpointing and cfg.resume_from_checkpoint == "latest"
    assert cfg.lora_target_modules == ["to_q", "to_k", "to_v"] and cfg.validation_prompts == ["a", "b"]
    with pytest.raises(ValueError, match="text_encoder_use_lora"):
        config_from_args(["--pretrained_model_name_or_path", "x", "--text_encoder_use_lora"])


def run_here(module: str, args: list[str]) -> None:
    """A module's main() in this process (no new interpreter to start: the import time dominates here)."""
    assert importlib.import_module(module).main(args) == 0


@pytest.mark.slow
def test_style_recipe_end_to_end(tmp_path, published_dirs):
    """Step 1 from one image (LoRA, fp16 flags as published, wandb offline), generate candidates with the adapters,
    step 2 on a folder resuming the latest checkpoint."""
    base = str(published_dirs("tiny-256"))
    rng = np.random.default_rng(0)
    image = tmp_path / "A woman working on a laptop in [V] style.png"
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "out"
    common = [
        "--pretrained_model_name_or_path",
        base,
        "--use_lora",
        "--train_batch_size",
        "2",
        "--lr_scheduler",
        "constant",
        "--mixed_precision",
        "fp16",
        "--learning_rate",
        "0.00003",
        "--resolution",
        "32",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "2",
        "--gradient_checkpointing",
        "--output_dir",
        str(out),
        "--checkpoints_total_limit",
        "1",
        "--validation_prompts",
        "A chihuahua walking on the street in [V] style",
        "--validation_inference_steps",
        "2",
        "--device",
        "cpu",
        "--seed",
        "0",
    ]
    step1 = ["--instance_data_image", str(image), "--max_train_steps", "2", "--report_to", "wandb"]
    run_muse(["train", *common, *step1], WANDB_MODE="offline")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora.safetensors").is_file()
    assert (out / "validation/step-2/00.png").is_file()
    assert list((out / "logs").glob("wandb/offline-run-*"))  # wandb ran offline
    assert [s for s, _ in checkpoint.checkpoints(out)] == [2]

    candidates = tmp_path / "candidates"
    run_here(
        "train.generate_images",
        [
            "--pretrained_model_name_or_path",
            base,
            "--write_images_to",
            str(candidates),
            "--load_transformer_lora_from",
            str(out),
            "--device",
            "cpu",
            "--num_inference_steps",
            "2",
            "--prompts",
            "A tabby cat in [V] style",
            "A church in [V] style",
        ],
    )
    assert sorted(p.name for p in candidates.iterdir()) == ["A church in [V] style.png", "A tabby cat in [V] style.png"]

    folder = tmp_path / "chosen"
    folder.mkdir()
    for p in candidates.iterdir():
        p.rename(folder / p.name)
    assert (
        muse_main(
            ["train", *common, "--instance_data_dir", str(folder), "--resume_from", "latest", "--max_train_steps", "4"]
        )
        == 0
    )
    assert "resumed from" in (out / "logs/train.log").read_text()
    assert [s for s, _ in checkpoint.checkpoints(out)] == [4]  # at most 1 kept


@pytest.mark.slow
def test_generate_images_with_a_fully_trained_transformer(tmp_path, published_dirs):
    """--load_transformer_from takes the transformer/ folder a full fine-tune writes."""
    base = str(published_dirs("tiny-256"))
    images = tmp_path / "img"
    images.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / "a cube.png")
    out = tmp_path / "out"
    assert (
        muse_main(
            [
                "train",
                "--pretrained_model_name_or_path",
                base,
                "--instance_data_dir",
                str(images),
                "--resolution",
                "32",
                "--train_batch_size",
                "1",
                "--max_train_steps",
                "1",
                "--output_dir",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (out / "transformer/config.json").is_file()
    run_here(
        "train.generate_images",
        [
            "--pretrained_model_name_or_path",
            base,
            "--write_images_to",
            str(tmp_path / "gen"),
            "--load_transformer_from",
            str(out),
            "--device",
            "cpu",
            "--num_inference_steps",
            "2",
            "--prompts",
            "a cube",
        ],
    )
    assert (tmp_path / "gen" / "a cube.png").is_file()
