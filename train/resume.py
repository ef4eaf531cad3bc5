"""What a checkpoint was trained with, and whether this run may continue it.

A checkpoint's `state.json` records the run's settings (`settings_of`). Before any saved state is loaded, `compare`
sorts the differences between those and this run's settings into two kinds:

  - settings that shape the saved state: which tensors are trained and how they are stored (LoRA or full, LoRA rank,
    alpha and targets, the text encoder's training), the optimizer's state layout (8-bit AdamW), the grad scaler
    and frozen-weight dtype (mixed precision), the EMA shadow, and the base model's U-ViT. Continuing with any of
    them changed would load state into the wrong tensors, or train tensors that are never saved: refused, with all
    the differences in one error;
  - settings that are safe to change on resume (learning rate, steps, batch size, resolution, the schedule, the
    optimizer's hyperparameters, the masking and conditioning options, the data): allowed, each change logged as a
    warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import TrainConfig

log = logging.getLogger("train")


def _lora(cfg: dict) -> bool:
    return bool(cfg.get("use_lora"))


def _text_encoder_lora(cfg: dict) -> bool:
    return bool(cfg.get("train_text_encoder")) and bool(cfg.get("text_encoder_use_lora"))


def _always(cfg: dict) -> bool:
    return True


# setting -> when it matters (checked on both the saved and this run's settings)
SHAPING = {
    "use_lora": _always,
    "lora_r": _lora,
    "lora_alpha": _lora,
    "lora_target_modules": _lora,
    "train_text_encoder": _always,
    "text_encoder_use_lora": _always,
    "text_encoder_lora_r": _text_encoder_lora,
    "text_encoder_lora_alpha": _text_encoder_lora,
    "text_encoder_lora_target_modules": _text_encoder_lora,
    "use_8bit_adam": _always,
    "mixed_precision": _always,
    "use_ema": _always,
}

SAFE_TO_CHANGE = (
    "learning_rate",
    "scale_lr",
    "max_train_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "resolution",
    "lr_scheduler",
    "lr_warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "ema_decay",
    "ema_update_after_step",
    "ema_warmup",
    "min_masking_rate",
    "cond_dropout_prob",
    "label_smoothing",
    "loss_per_sample",
    "rect_mask_prob",
    "masking_schedule",
    "lora_dropout",
    "instance_data_dataset",
    "instance_data_dir",
    "instance_data_image",
    "instance_data_metadata",
    "image_key",
    "prompt_key",
    "prompt_prefix",
    "pre_encode",
    "pretrained_model_name_or_path",
    "revision",
    "variant",
)


def settings_of(cfg: TrainConfig, transformer_config: dict) -> dict:
    """What a checkpoint records of its run: the whole configuration and the base U-ViT's config."""
    return {"config": cfg.to_dict(), "transformer_config": dict(transformer_config)}


def compare(saved: dict, cfg: TrainConfig, transformer_config: dict) -> tuple[list[str], list[str]]:
    """(refused differences, allowed differences) between a checkpoint's recorded settings and this run's, each as
    'name: saved -> now'."""
    old, new = saved.get("config", {}), cfg.to_dict()
    refused = []
    for name, matters in SHAPING.items():
        if (matters(old) or matters(new)) and _normal(old.get(name)) != _normal(new.get(name)):
            refused.append(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    old_model = saved.get("transformer_config")
    if old_model is not None and old_model != dict(transformer_config):
        changed = sorted(
            k for k in set(old_model) | set(transformer_config) if old_model.get(k) != transformer_config.get(k)
        )
        details = ", ".join(f"{k} {old_model.get(k)!r} -> {transformer_config.get(k)!r}" for k in changed[:6])
        refused.append(f"the base model's U-ViT differs ({details})")
    allowed = []
    for name in SAFE_TO_CHANGE:
        if name in old and _normal(old[name]) != _normal(new.get(name)):
            allowed.append(f"{name}: {old[name]!r} -> {new.get(name)!r}")
    if cfg.seed is not None and "seed" in old and old["seed"] is not None and old["seed"] != cfg.seed:
        allowed.append(f"seed: {old['seed']!r} -> {cfg.seed!r}")
    return refused, allowed


def check(path: Path, info: dict, cfg: TrainConfig, transformer_config: dict) -> None:
    """Refuse to resume `path` (its state.json content `info`) with settings that shape its state differently;
    log each allowed change. Checkpoints written before settings were recorded are checked for --use_lora only."""
    if "config" not in info:
        if bool(info.get("use_lora", False)) != cfg.use_lora:
            was = "with" if info.get("use_lora") else "without"
            raise ValueError(f"cannot resume {path}: it was saved {was} --use_lora; resume with the same setting")
        log.warning("%s records no training settings (an older checkpoint): resuming without checking them", path)
        return
    refused, allowed = compare(info, cfg, transformer_config)
    if refused:
        raise ValueError(
            f"cannot resume {path} with different settings that shape its saved state: {'; '.join(refused)}. "
            "Resume with the checkpoint's settings, or start a new run in another --output_dir"
        )
    for change in allowed:
        log.warning("resuming %s with a changed setting: %s", path.name, change)


def _normal(value):
    """Lists and tuples compare equal whatever their order (target lists); so do 32 and 32.0."""
    if isinstance(value, (list, tuple)):
        return sorted(_normal(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
