"""`muse train` (or `python -m train`, `torchrun --nproc_per_node N -m train`): the reference script's flags,
unchanged, plus ours.

The published recipes (aMUSEd README) run with only the launcher changed, e.g. the 256 LoRA recipe:

    muse train --pretrained_model_name_or_path amused/amused-256 \\
        --instance_data_dataset m1guelpf/nouns --image_key image --prompt_key text --resolution 256 \\
        --train_batch_size 1 --gradient_accumulation_steps 16 --learning_rate 8e-4 --use_lora \\
        --mixed_precision fp16 --lr_scheduler constant --max_train_steps 10000 --checkpointing_steps 500 \\
        --validation_steps 250 --gradient_checkpointing --output_dir out/nouns-lora \\
        --validation_prompts 'a pixel art character with square red glasses'
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from . import distributed
from .config import TrainConfig
from .loop import train


def parser(prog: str = "python -m train") -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=prog, description="Fine-tune the aMUSEd U-ViT (full, 8-bit Adam or LoRA).")
    g = p.add_argument_group("model")
    g.add_argument(
        "--pretrained_model_name_or_path", required=True, help="published folder, hub id or one of our folders"
    )
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weight file variant, e.g. fp16")
    g = p.add_argument_group("data (exactly one of the three sources)")
    g.add_argument("--instance_data_dataset", default=None, help="Hugging Face dataset name or local path")
    g.add_argument("--instance_data_dir", default=None, help="folder of images; prompt = file name without extension")
    g.add_argument("--instance_data_image", default=None, help="a single image (style training)")
    g.add_argument(
        "--instance_data_metadata",
        default=None,
        help="(ours) captions for --instance_data_dir: .jsonl/.csv with file_name and the prompt column",
    )
    g.add_argument(
        "--skip_invalid_metadata",
        action="store_true",
        help="(ours) skip metadata rows that are unparsable, "
        "name no image or lack a string caption (each is logged and counted) instead of stopping",
    )
    g.add_argument("--image_key", default=None)
    g.add_argument("--prompt_key", default=None)
    g.add_argument("--prompt_prefix", default=None)
    g.add_argument("--resolution", type=int, default=d.resolution)
    g.add_argument("--dataloader_num_workers", type=int, default=d.dataloader_num_workers)
    g.add_argument(
        "--split_vae_encode", type=int, default=None, help="VQ-encode the batch in chunks of this many images"
    )
    g.add_argument(
        "--pre_encode",
        action="store_const",
        const=True,
        default=None,
        help="(ours) encode the data once to VQ tokens and text embeddings; the VQ-GAN and text encoder are then freed. "
        "Automatic by default: on when it changes nothing the step computes (every image has a single crop at "
        "--resolution, the text encoder is frozen, the run reads every example at least once)",
    )
    g.add_argument(
        "--no_pre_encode",
        dest="pre_encode",
        action="store_const",
        const=False,
        help="(ours) never pre-encode: the frozen encoders run in every step, as in the reference's script",
    )
    g.add_argument(
        "--pre_encoded_dir",
        default=None,
        help="(ours) where the pre-encoded cache lives (default <output_dir>/pre_encoded)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument("--logging_dir", default=d.logging_dir)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--train_batch_size", type=int, default=d.train_batch_size, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--logging_steps", type=int, default=d.logging_steps)
    g.add_argument("--checkpointing_steps", type=int, default=d.checkpointing_steps)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument(
        "--resume_from_checkpoint",
        "--resume_from",
        dest="resume_from_checkpoint",
        default=None,
        help='"latest" or a checkpoint folder',
    )
    g.add_argument("--validation_steps", type=int, default=d.validation_steps)
    g.add_argument("--validation_prompts", type=str, nargs="*", default=[])
    g.add_argument("--validation_inference_steps", type=int, default=d.validation_inference_steps, help="(ours)")
    g.add_argument(
        "--report_to", default=d.report_to, help='"wandb" to log there too (WANDB_MODE=offline works); default none'
    )
    g.add_argument("--device", default=None, help="(ours) default: cuda:<local rank> if available, else cpu")
    g.add_argument("--debug", action="store_true", help="(ours) show the traceback of an error (also MUSE_DEBUG=1)")
    g.add_argument(
        "--no_save_at_end",
        dest="save_at_end",
        action="store_false",
        help="(ours) no last checkpoint or weights at the end (benchmarks)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--scale_lr", action="store_true", help="multiply the lr by batch x processes x accumulation")
    g.add_argument("--lr_scheduler", default=d.lr_scheduler, help="constant | constant_with_warmup | linear | cosine")
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--use_8bit_adam", action="store_true")
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam_weight_decay", type=float, default=d.adam_weight_decay)
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--max_grad_norm", type=float, default=None)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument(
        "--recompute_attention",
        action="store_const",
        const=True,
        default=None,
        help="(ours) recompute the U-ViT attentions' q, k and v in the backward instead of saving them: the same "
        "gradients, less memory, three more projections per attention. Automatic by default: on with --use_lora",
    )
    g.add_argument(
        "--no_recompute_attention",
        dest="recompute_attention",
        action="store_const",
        const=False,
        help="(ours) save the attentions' q, k and v (faster, more memory)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="(ours) torch.compile the U-ViT's training step: faster after the first steps, which compile; "
        "rounding may differ from the eager step's; on a CPU it needs a C++ compiler",
    )
    g.add_argument(
        "--no_cpu_caching_allocator",
        dest="cpu_caching_allocator",
        action="store_false",
        help="(ours) on a CPU, train on torch's own allocator instead of the caching one (train/cpu_cache.py)",
    )
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=d.ema_decay)
    g.add_argument("--ema_update_after_step", type=int, default=d.ema_update_after_step)
    g.add_argument(
        "--ema_fixed_decay",
        dest="ema_warmup",
        action="store_false",
        help="(ours) use --ema_decay from the first step, no warm-up",
    )
    g = p.add_argument_group("masking and conditioning")
    g.add_argument("--min_masking_rate", type=float, default=d.min_masking_rate)
    g.add_argument("--cond_dropout_prob", type=float, default=d.cond_dropout_prob)
    g.add_argument("--label_smoothing", type=float, default=d.label_smoothing, help="(ours)")
    g.add_argument(
        "--loss_per_sample",
        action="store_true",
        help="(ours) mean over samples of each sample's masked-token mean, not the mean over the batch's masked tokens",
    )
    g.add_argument(
        "--rect_mask_prob",
        type=float,
        default=d.rect_mask_prob,
        help="(ours) share of samples masked with one rectangle",
    )
    g.add_argument(
        "--masking_schedule",
        default=d.masking_schedule,
        help="(ours) how a sample's masking ratio r is drawn from t ~ U(0, 1): cosine (the reference's), linear, "
        "arccos or power:E",
    )
    g = p.add_argument_group("LoRA and the text encoder")
    g.add_argument("--use_lora", action="store_true")
    g.add_argument("--lora_r", type=int, default=d.lora_r)
    g.add_argument("--lora_alpha", type=float, default=d.lora_alpha)
    g.add_argument("--lora_dropout", type=float, default=d.lora_dropout, help="(ours)")
    g.add_argument("--lora_target_modules", type=str, nargs="+", default=list(d.lora_target_modules))
    g.add_argument("--train_text_encoder", action="store_true")
    g.add_argument("--text_encoder_use_lora", action="store_true")
    g.add_argument("--text_encoder_lora_r", type=int, default=d.text_encoder_lora_r)
    g.add_argument("--text_encoder_lora_alpha", type=float, default=d.text_encoder_lora_alpha)
    g.add_argument(
        "--text_encoder_lora_target_modules", type=str, nargs="+", default=list(d.text_encoder_lora_target_modules)
    )
    return p


def config_from_args(argv: list[str] | None = None, prog: str = "python -m train") -> TrainConfig:
    return config_from_namespace(parser(prog).parse_args(argv))


def config_from_namespace(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


# what a user's mistake raises (a bad flag value, a missing or unwritable path, a full disk, a checkpoint that does
# not fit, a missing optional package, a batch too large for the GPU); anything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, OSError, ImportError, torch.OutOfMemoryError)


def main(argv: list[str] | None = None, prog: str = "python -m train") -> int:
    """Train; a user error ends in one line `error: ...` and exit code 2 (--debug or MUSE_DEBUG=1: the traceback)."""
    args = parser(prog).parse_args(argv)
    debug = args.debug or os.environ.get("MUSE_DEBUG", "") not in ("", "0")
    try:
        train(config_from_namespace(args))
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0


def error_message(error: BaseException) -> str:
    """One line saying what went wrong: the first line of the message (an OSError as 'path: reason')."""
    if isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        text = str(error) or type(error).__name__
    if isinstance(error, torch.OutOfMemoryError):
        text = f"out of memory: {text} (lower --train_batch_size, or use --gradient_checkpointing, --mixed_precision, --use_lora)"
    if isinstance(error, ImportError) and not str(error):
        text = f"a package is missing: {error.name}"
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
