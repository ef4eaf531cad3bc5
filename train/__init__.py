"""train: fine-tune the aMUSEd U-ViT with a plain PyTorch loop (full, 8-bit Adam or our own LoRA layers).

    python -m train --help                 the reference script's flags (see train.cli)
    python -m train.generate_images ...    images from a base model plus a trained transformer or LoRA adapter

Modules, one idea each: config (the run's settings), data (sources, preprocessing, sampler, pre-encoding), masking
(masks and the loss), optim (parameter groups, AdamW / AdamW8bit, lr schedules), ema, checkpoint (atomic save,
resume), resume (which settings a resume may change), distributed (torchrun/DDP), tracking (console and wandb),
loop (the training loop itself), vq (VQ-GAN training), default_model (the recipe of the embedded model). The LoRA
layers live in `uvit.lora` and their files in `convert.lora` (the pipeline loads adapters too); their names are
re-exported here.
"""

from convert.lora import inject_lora, load_lora_into, save_lora
from uvit.lora import LoRALinear, merge_lora, unmerge_lora

from .config import TrainConfig
from .loop import TrainResult, train

__all__ = [
    "LoRALinear",
    "TrainConfig",
    "TrainResult",
    "inject_lora",
    "load_lora_into",
    "merge_lora",
    "save_lora",
    "train",
    "unmerge_lora",
]
