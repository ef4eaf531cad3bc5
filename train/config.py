"""Everything a training run is told, as one dataclass. Field names and defaults are those of the reference script's
flags (the reference's aMUSEd fine-tuning script in diffusers' examples), so its recipes run unchanged; our additions are marked."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from sampling.schedules import MaskingSchedule

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# numeric option -> (lowest value, highest value or None, whether the lowest value itself is excluded)
NUMBER_RANGES = [
    ("learning_rate", 0.0, None, True),
    ("adam_beta1", 0.0, 1.0, False),
    ("adam_beta2", 0.0, 1.0, False),
    ("adam_weight_decay", 0.0, None, False),
    ("adam_epsilon", 0.0, None, True),
    ("max_grad_norm", 0.0, None, True),
    ("ema_decay", 0.0, 1.0, False),
    ("lora_alpha", 0.0, None, True),
    ("text_encoder_lora_alpha", 0.0, None, True),
    ("lora_r", 1, None, False),
    ("text_encoder_lora_r", 1, None, False),
    ("lr_warmup_steps", 0, None, False),
    ("ema_update_after_step", 0, None, False),
    ("dataloader_num_workers", 0, None, False),
    ("validation_inference_steps", 1, None, False),
]
OPTIONAL_NUMBERS = {"max_grad_norm"}


@dataclass
class TrainConfig:
    # --- model ---
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    variant: str | None = None
    # --- data (exactly one source) ---
    instance_data_dataset: str | None = None  # a Hugging Face dataset name or local path
    instance_data_dir: str | None = None  # a folder of images; prompt = file stem (or metadata.jsonl/csv)
    instance_data_image: str | None = None  # one image (style training)
    instance_data_metadata: str | None = None  # ours: captions file for the folder (default: metadata.jsonl/csv in it)
    skip_invalid_metadata: bool = False  # ours: skip (and count) unusable metadata rows instead of stopping
    image_key: str | None = None
    prompt_key: str | None = None
    prompt_prefix: str | None = None
    resolution: int = 512
    dataloader_num_workers: int = 0
    split_vae_encode: int | None = None  # VQ-encode the batch in chunks of this many images
    # ours: encode the data once to VQ tokens + text embeddings, then train from the cache with the encoders freed.
    # None (automatic): when that changes nothing the step computes (see train.loop.choose_pre_encode)
    pre_encode: bool | None = None
    pre_encoded_dir: str | None = None  # ours: where the cache lives (default <output_dir>/pre_encoded)
    # --- batch, steps, output ---
    train_batch_size: int = 16  # per process
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    output_dir: str = "muse_training"
    logging_dir: str = "logs"
    logging_steps: int = 50
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # "latest" or a path
    seed: int | None = None
    report_to: str = "none"  # "wandb" to log there too (the reference defaults to wandb)
    validation_steps: int = 100
    validation_prompts: list[str] = field(default_factory=list)
    # --- optimisation ---
    learning_rate: float = 3e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 500
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = None
    mixed_precision: str | None = None  # no | fp16 | bf16
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    # ours: recompute the attentions' q, k and v in the backward instead of saving them (the same gradients; less
    # memory, three more projections per attention). None (automatic): on with LoRA (train.loop.recompute_attention)
    recompute_attention: bool | None = None
    # ours: torch.compile the U-ViT for the training step (the same computation, fused kernels: rounding may differ
    # from the eager step's; the first steps compile; on a CPU it needs a C++ compiler)
    compile: bool = False
    # ours: on a CPU, the step's tensors come from a caching allocator (train/cpu_cache.py: the same values, less
    # heap fragmentation; it needs a C++ compiler, else torch's own allocator is used)
    cpu_caching_allocator: bool = True
    use_ema: bool = False
    ema_decay: float = 0.9999
    ema_update_after_step: int = 0
    ema_warmup: bool = True  # ours: decay min(ema_decay, (1+s)/(10+s)); False = ema_decay throughout
    # --- masking and conditioning ---
    min_masking_rate: float = 0.0
    cond_dropout_prob: float = 0.0
    label_smoothing: float = 0.0  # ours (the original runs used 0.1)
    # ours: the loss as the mean over samples of each sample's masked-token mean (every sample weighs alike, whatever
    # its masking ratio), instead of the reference's mean over all masked tokens of the batch
    loss_per_sample: bool = False
    rect_mask_prob: float = 0.0  # ours: share of samples masked with a rectangle (the original runs used 0.15)
    # ours: how the masking ratio r is drawn from t ~ U(0, 1): a masking schedule of `sampling.schedules`
    # ("cosine", the reference's: r = cos(t pi / 2); "linear": r = 1 - t; "arccos"; "power:E")
    masking_schedule: str = "cosine"
    # --- LoRA ---
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0  # ours
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v"])
    train_text_encoder: bool = False
    text_encoder_use_lora: bool = False
    text_encoder_lora_r: int = 16
    text_encoder_lora_alpha: float = 32
    text_encoder_lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v"])
    # --- ours: placement and validation ---
    device: str | None = None  # default: cuda:<local rank> when CUDA is available, else cpu
    validation_inference_steps: int = 12
    save_at_end: bool = True  # ours: write a last checkpoint and the trained weights when the run ends

    def __post_init__(self):
        if self.mixed_precision is None:
            self.mixed_precision = "no"
        problems = []
        if self.mixed_precision not in DTYPES:
            problems.append(f"mixed_precision must be one of {list(DTYPES)}, got {self.mixed_precision!r}")
        for name in (
            "train_batch_size",
            "gradient_accumulation_steps",
            "resolution",
            "checkpointing_steps",
            "logging_steps",
            "validation_steps",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            problems.append(f"max_train_steps must be >= 1, got {self.max_train_steps}")
        for name in ("cond_dropout_prob", "min_masking_rate", "rect_mask_prob", "label_smoothing", "lora_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        problems += self._number_problems()
        try:
            MaskingSchedule.parse(self.masking_schedule)
        except (TypeError, ValueError) as e:
            problems.append(f"masking_schedule: {e}")
        if self.text_encoder_use_lora and not self.train_text_encoder:
            problems.append("--text_encoder_use_lora needs --train_text_encoder")
        if self.pre_encode is True and self.train_text_encoder:
            problems.append(
                "--pre_encode stores fixed text embeddings; it cannot be combined with --train_text_encoder"
            )
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            problems.append(f"checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}")
        if self.report_to not in ("none", "wandb", "all"):
            problems.append(f"report_to must be 'none' or 'wandb', got {self.report_to!r}")
        if problems:
            raise ValueError("invalid training configuration: " + "; ".join(problems))

    def _number_problems(self) -> list[str]:
        """The numeric options that must be finite and in their range (a NaN learning rate trains NaNs)."""
        problems = []
        for name, low, high, low_open in NUMBER_RANGES:
            value = getattr(self, name)
            if value is None and name in OPTIONAL_NUMBERS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
            elif value < low or (low_open and value == low) or (high is not None and value > high):
                lower = f"> {low}" if low_open else f">= {low}"
                problems.append(
                    f"{name} must be {lower}" + (f" and <= {high}" if high is not None else "") + f", got {value}"
                )
        return problems

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of frozen weights and of autocast: fp32, fp16 or bf16."""
        return DTYPES[self.mixed_precision]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
