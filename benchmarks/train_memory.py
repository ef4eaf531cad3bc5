"""Peak memory of the fine-tuning recipes on the full-size U-ViTs, beside the published aMUSEd README's figures.

A benchmark, not a test. For amused-256 and amused-512 at batch 1 (gradient checkpointing on, as every published
recipe): full fine-tune, full + 8-bit AdamW, LoRA (rank 16 on q/k/v), LoRA on pre-encoded data. Each configuration
runs `train.loop.train` for a few steps in a fresh process and reports
  - CPU: the peak resident memory of the whole process (loading included) and of the training steps alone
    (sampled; loading and pre-encoding excluded), next to the floor: the resident memory of the interpreter with
    the code every run imports (torch, transformers' CLIP model, which pulls in scipy, sympy, torchvision and more,
    our packages, and bitsandbytes for the 8-bit recipes) and no model yet. A GPU figure counts none of that floor, so
    the training peak above it is the CPU number to set beside a GPU one. glibc's mmap threshold is pinned (64 KiB) in the
    children so that freed tensors leave the resident set: otherwise freed heap pages stay counted;
  - CUDA, when available: torch.cuda.max_memory_allocated over the training steps (and the whole run), and the
    reserved peak (what nvidia-smi would roughly show, minus the CUDA context).
The published figures (GPU, fp16, gradient checkpointing) are per batch x accumulation; peak memory does not grow
with accumulation (the gradients are held either way), so batch 1 compares with their batch-1 rows.

Without --weights the models are random (only shapes matter for memory): a folder in our format is written once per
model under --work_dir (3.5 GB each). Run it under the heavy lock on a shared machine:

    flock /tmp/muse-heavy.lock python benchmarks/train_memory.py                  # CPU, both models, all recipes
    python benchmarks/train_memory.py --device cuda                               # on a GPU (fp16, as published)
    python benchmarks/train_memory.py --models 256 --recipes lora lora-pre-encoded --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RECIPES = {  # name -> TrainConfig overrides (learning rates of the published recipes; they do not change memory)
    "full": dict(learning_rate=1e-4),
    "full-8bit": dict(learning_rate=2e-5, use_8bit_adam=True),
    "lora": dict(learning_rate=8e-4, use_lora=True),
    "lora-pre-encoded": dict(learning_rate=8e-4, use_lora=True, pre_encode=True),
}
# the published aMUSEd README: GB at batch 1 and the accumulation of that row
PUBLISHED = {
    ("256", "full"): (17.9, 8),
    ("256", "full-8bit"): (10.7, 16),
    ("256", "lora"): (6.5, 16),
    ("512", "full"): (16.99, 8),
    ("512", "full-8bit"): (9.9, 8),
    ("512", "lora"): (5.6, 8),
}
GOAL = 0.7  # each recipe at least 30% below the published figure


def published(model: str, recipe: str) -> tuple[float, int]:
    return PUBLISHED[(model, "lora" if recipe.startswith("lora") else recipe)]


# --- the child: one configuration -----------------------------------------------------------------------------------


def make_random_model(model: str, folder: Path) -> Path:
    """A full-size aMUSEd of random weights in our format (only the shapes matter here)."""
    import random_models  # this script's folder (benchmarks/), first on sys.path when it runs

    return random_models.write_random_model(model, folder)


def child(args) -> None:
    import numpy as np
    import torch

    # the code every training run imports, before the floor is read: it is process overhead, not model memory
    import transformers.models.clip.modeling_clip  # noqa: F401  (the CLIP model's module and its dependencies)
    from PIL import Image

    import convert  # noqa: F401
    import muse  # noqa: F401
    from train.config import TrainConfig
    from train.loop import train
    from train.tracking import current_rss_mb

    if RECIPES[args.recipe].get("use_8bit_adam"):
        import bitsandbytes  # noqa: F401
    torch.set_num_threads(args.threads)
    floor = current_rss_mb()
    res = 256 if args.model == "256" else 512
    work = Path(args.work_dir)
    weights = (
        Path(args.model_weights)
        if args.model_weights
        else make_random_model(args.model, work / f"random-amused-{args.model}")
    )
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        images = Path(tmp) / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (res + 64, res, 3), dtype=np.uint8)).save(
            images / "a pixel art character.png"
        )
        cuda = args.device.startswith("cuda")
        cfg = TrainConfig(
            pretrained_model_name_or_path=str(weights),
            instance_data_dir=str(images),
            resolution=res,
            train_batch_size=1,
            gradient_accumulation_steps=args.accumulation or (published(args.model, args.recipe)[1] if cuda else 1),
            max_train_steps=args.steps,
            mixed_precision=args.mixed_precision or ("fp16" if cuda else "bf16"),
            gradient_checkpointing=True,
            lr_scheduler="constant",
            output_dir=str(Path(tmp) / "out"),
            seed=0,
            logging_steps=10**6,
            checkpointing_steps=10**6,
            save_at_end=False,
            device=args.device,
            **RECIPES[args.recipe],
        )
        start = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - start
    print(
        "RESULT "
        + json.dumps(
            {
                "model": args.model,
                "recipe": args.recipe,
                "device": args.device,
                "mixed_precision": cfg.mixed_precision,
                "accumulation": cfg.gradient_accumulation_steps,
                "steps": args.steps,
                "seconds": round(seconds, 1),
                "floor_rss_mb": round(floor, 1),
                **result.memory,
            }
        )
    )


# --- the parent: every configuration in a fresh process, then the table ----------------------------------------------


def run_all(args) -> list[dict]:
    rows = []
    for model in args.models:
        for recipe in args.recipes:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--model",
                model,
                "--recipe",
                recipe,
                "--device",
                args.device,
                "--steps",
                str(args.steps),
                "--work_dir",
                args.work_dir,
                "--threads",
                str(args.threads),
            ]
            if args.weights:
                cmd += ["--model_weights", args.weights[model]]
            for flag in ("mixed_precision", "accumulation"):
                if getattr(args, flag):
                    cmd += [f"--{flag}", str(getattr(args, flag))]
            print(f"-- {model} {recipe}", flush=True)
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            if args.malloc_mmap_threshold:
                # glibc serves allocations of at least this size with mmap and returns them to the OS when freed, so
                # the resident size follows the live tensors instead of keeping freed heap pages (fragmentation)
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                rows.append({"model": model, "recipe": recipe, "error": f"exit {proc.returncode}"})
                continue
            rows.append(json.loads(lines[-1][len("RESULT ") :]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    cuda = any("training_cuda_max_allocated_mb" in r for r in rows)
    head = ["model", "recipe", "published GB (batch x acc)", "goal GB (-30%)"]
    if cuda:
        head += ["CUDA max allocated, training GiB", "vs published", "CUDA max reserved GiB"]
    head += [
        "CPU peak RSS, training GiB",
        "above the floor GiB",
        "CPU peak RSS, whole run GiB",
        "RSS floor GiB",
        "s / run",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pub, acc = published(r["model"], r["recipe"])
        cells = [f"amused-{r['model']}", r["recipe"], f"{pub} (1 x {acc})", f"{GOAL * pub:.2f}"]
        if "error" in r:
            lines.append("| " + " | ".join(cells + [r["error"]]) + " |")
            continue
        if cuda:
            alloc = r.get("training_cuda_max_allocated_mb", 0) / 1024
            cells += [
                f"{alloc:.2f}",
                f"{100 * (alloc / pub - 1):+.0f}%",
                f"{r.get('training_cuda_max_reserved_mb', 0) / 1024:.2f}",
            ]
        cells += [
            f"{r['training_peak_rss_mb'] / 1024:.2f}",
            f"{(r['training_peak_rss_mb'] - r['floor_rss_mb']) / 1024:.2f}",
            f"{r['peak_rss_mb'] / 1024:.2f}",
            f"{r['floor_rss_mb'] / 1024:.2f}",
            str(r["seconds"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["256", "512"], choices=["256", "512"])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--steps",
        type=int,
        default=2,
        help="optimizer steps per configuration (the first allocates the optimizer state)",
    )
    p.add_argument("--accumulation", type=int, default=None, help="default: the published row's on CUDA, 1 on CPU")
    p.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="default: fp16 on CUDA (as published), bf16 on CPU",
    )
    p.add_argument(
        "--weights",
        nargs=2,
        metavar=("DIR256", "DIR512"),
        default=None,
        help="real model folders instead of random ones",
    )
    p.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "muse-train-memory"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--malloc_mmap_threshold",
        type=int,
        default=65536,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the children (0: glibc's default)",
    )
    p.add_argument("--json", default=None, help="also write the rows here")
    # the child's own options
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model_weights", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args)
        return
    if args.weights:
        args.weights = dict(zip(("256", "512"), args.weights))
    rows = run_all(args)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
