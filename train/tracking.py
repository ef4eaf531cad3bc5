"""Where the numbers go: the console (and a log file), and wandb when asked (`--report_to wandb`; set
WANDB_MODE=offline to run without an account or network). Only the main process reports."""

from __future__ import annotations

import logging
import os
import resource
import sys
import threading
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


def current_rss_mb() -> float:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


class MemoryMonitor:
    """The peak of the resident memory over a stretch of the run, and on CUDA the peak of allocated memory over the
    same stretch. `ru_maxrss` cannot be reset; this can: it tells the training steps' memory apart from loading and
    pre-encoding. A thread reads the resident size every `interval` seconds, and the loop adds a reading at every
    optimizer step (`sample`). The interval is coarse on purpose: a thread that wakes every few milliseconds competes
    with the training step for the GIL and the cores (on a 2-core machine the step slows measurably); a coarse
    interval misses at most a transient shorter than it, and the whole-process peak (`peak_rss_mb`, from
    ru_maxrss) is exact anyway."""

    def __init__(self, device: torch.device, interval: float = 0.25):
        self.device, self.interval = device, interval
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.setup_cuda_peak_mb = 0.0

    def sample(self) -> None:
        """One reading now (a /proc read: microseconds)."""
        self.peak_rss_mb = max(self.peak_rss_mb, current_rss_mb())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> "MemoryMonitor":
        if self.device.type == "cuda":
            self.setup_cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.sample()
        stats = {"peak_rss_mb": round(peak_rss_mb(), 1), "training_peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.device.type == "cuda":
            training = torch.cuda.max_memory_allocated(self.device) / 2**20
            stats["training_cuda_max_allocated_mb"] = round(training, 1)
            stats["cuda_max_allocated_mb"] = round(max(training, self.setup_cuda_peak_mb), 1)
            stats["training_cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
        return stats


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
                import wandb  # optional: only with --report_to wandb
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
            import wandb  # optional: only with --report_to wandb

            self.wandb.log({"validation": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
