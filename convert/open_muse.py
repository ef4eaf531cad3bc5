"""open-muse original checkpoints (MaskGiTUViT_v2 + taming VQGANModel) -> ours. (Work in progress.)"""

from __future__ import annotations

from pathlib import Path

from .safe_load import CheckpointError

UVIT_CLASSES = ("MaskGiTUViT", "MaskGiTUViT_v2")


def is_open_muse_folder(folder: Path) -> bool:
    import json

    cfg = Path(folder) / "transformer" / "config.json"
    try:
        return json.loads(cfg.read_text()).get("_class_name") in UVIT_CLASSES
    except (OSError, ValueError, AttributeError):
        return False


def load_open_muse(folder, dtype=None, variant=None, progress=None):
    raise CheckpointError(f"{folder}: open-muse checkpoints are not supported yet")
