"""train: fine-tune the aMUSEd U-ViT with a plain PyTorch loop (full, 8-bit Adam or our own LoRA layers).

    python -m train --help                 the reference script's flags (see train.cli)
    python -m train.generate_images ...    images from a base model plus a trained transformer or LoRA adapter

Modules, one idea each: config (the run's settings), data (sources, preprocessing, sampler, pre-encoding), masking
(masks and the loss), lora (LoRALinear, injection, adapter files in our and the peft format), optim (parameter
groups, AdamW / AdamW8bit, lr schedules), ema, checkpoint (atomic save, resume), resume (which settings a resume
may change), distributed (torchrun/DDP), tracking (console and wandb), loop (the training loop itself).
"""

from .config import TrainConfig
from .lora import LoRALinear, inject_lora, load_lora_into, merge_lora, save_lora, unmerge_lora

__all__ = ["LoRALinear", "TrainConfig", "inject_lora", "load_lora_into", "merge_lora", "save_lora", "train", "unmerge_lora"]


def train(cfg, components=None):
    """Run a training (see train.loop.train); imported lazily so `import train` stays light."""
    from .loop import train as _train

    return _train(cfg, components)
