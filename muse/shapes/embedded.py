"""Where the embedded model of the shapes domain lives: the model `muse generate` uses when no --model is given.

Its files (our checkpoint format) are shipped inside the package, in `muse/assets/default/`; the recipe that writes
them is `train.default_model`."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "default"


def model_dir() -> Path:
    """The embedded model's folder, or a clear error when this installation has none."""
    if not MODEL_DIR.is_dir() or not any(MODEL_DIR.iterdir()):
        raise FileNotFoundError(
            f"no embedded default model found at {MODEL_DIR}; pass --model PATH_OR_ID on the command line "
            "(or a path or hub id to Pipeline.from_pretrained)"
        )
    return MODEL_DIR
