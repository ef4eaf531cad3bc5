"""Where the numbers go: the console (and a log file), and wandb when asked (`--report_to wandb`; set
WANDB_MODE=offline to run without an account or network). Only the main process reports."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

import torch

log = logging.getLogger("train")


def setup_logging(main: bool, logfile: Path | None = None) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if logfile is not None and main:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile))
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        handlers=handlers,
        force=True,
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_stats(device: torch.device) -> dict[str, float]:
    stats = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.type == "cuda":
        stats["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return stats


class Tracker:
    def __init__(self, report_to: str, main: bool, config: dict, directory: Path, project: str = "muse"):
        self.main = main
        self.wandb = None
        if main and report_to in ("wandb", "all"):
            try:
                import wandb
            except ImportError as e:
                raise ImportError("--report_to wandb needs the wandb package (pip install wandb)") from e
            directory.mkdir(parents=True, exist_ok=True)
            self.wandb = wandb.init(project=project, config=config, dir=str(directory))

    def log(self, metrics: dict, step: int) -> None:
        if not self.main:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        log.info("step %d %s", step, text)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_images(self, images, captions, step: int) -> None:
        if self.main and self.wandb is not None:
            import wandb

            self.wandb.log({"validation": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
