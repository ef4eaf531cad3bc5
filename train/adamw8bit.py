"""bitsandbytes' AdamW8bit with its CPU update fused: the same optimizer, state and numbers, fewer passes over memory.

bitsandbytes' CPU update of an 8-bit parameter (`bitsandbytes/backends/cpu/ops.py`) runs about fifteen whole-tensor
operations: dequantize both moments, update them and the parameter with torch ops, quantize the moments back. On a
full fine-tune of amused-256 that is most of the step (docs/training.md). `AdamW8bit` here is bitsandbytes'
`AdamW8bit` (a subclass: its state, `state_dict` and checkpoints are bitsandbytes'); only its per-parameter update
on the CPU goes through `train/csrc/adamw8bit.c` instead, in slices that stay in cache: one C pass dequantizes,
updates and requantizes the moments, `torch.sqrt` takes the second moment's root (torch's own kernel, whose rounding
bitsandbytes' update inherits), a second C pass updates the parameter. The result is bitsandbytes' to the bit
(tests/test_adamw8bit.py: parameters, quantized moments and their absmax).

The C source is compiled on first use with the system's C compiler (`cc`, or `$CC`) into a cache folder
(`$MUSE_CACHE`, else `~/.cache/muse`), once per source and compiler. Without a compiler, or for what the fused path
does not cover (CUDA, half-precision parameters, the 32-bit state of small tensors, `max_unorm`, `skip_zeros`,
other optimizers), the update is bitsandbytes' own.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import subprocess
import threading
from pathlib import Path

import torch

from . import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "adamw8bit.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states
SLICE = 1 << 18  # elements per fused slice: its fp32 moments and root (3 MiB) stay in cache between the passes

_lib: ctypes.CDLL | None | bool = None  # None: not tried yet; False: unavailable
_luts: dict[tuple[float, ...], torch.Tensor] = {}
_scratch = threading.local()  # per thread: the slice's fp32 moments and root, reused from call to call


def _compile() -> Path:
    """The shared library built from SOURCE, compiled once per source, compiler, flags and CPU."""
    cc = native.find_compiler("CC", ("cc", "gcc"))
    return native.build("adamw8bit", SOURCE, cc, FLAGS, ["-lm"], key=native.cpu_identity())


def _load() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(str(_compile()))
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.decode(errors="replace")[-500:] if isinstance(e, subprocess.CalledProcessError) else e
            log.warning("8-bit AdamW: bitsandbytes' own CPU update (the fused one did not build: %s)", detail)
            _lib = False
            return None
        p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        lib.muse_build_lut.argtypes = [p, p]
        lib.muse_adamw8bit_moments.argtypes = [p] * 9 + [i64] * 3 + [f32] * 5 + [i32, p, p]
        lib.muse_adamw8bit_params.argtypes = [p, p, p, i64, f32, f32, i32, f32, f32, i32]
        _lib = lib
    return _lib or None


def available() -> bool:
    """Whether the fused CPU update is built (compiling it if it is not yet)."""
    return _load() is not None


def _lut(qmap: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' quantization lookup table for a map (65536 bins of [-1, 1] -> nearest code), built once."""
    key = tuple(qmap.tolist())
    if key not in _luts:
        lut = torch.empty(65536, dtype=torch.uint8)
        _load().muse_build_lut(qmap.contiguous().data_ptr(), lut.data_ptr())
        _luts[key] = lut
    return _luts[key]


def _buffers(width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three fp32 buffers of at least `width` elements (the slice's m, v and sqrt(v)), kept for the next call."""
    held = getattr(_scratch, "buffers", None)
    if held is None or held[0].numel() < width:
        held = _scratch.buffers = tuple(torch.empty(width) for _ in range(3))
    return held


def _check(g, p, state1, state2, qmap1, qmap2, absmax1, absmax2) -> None:
    """The layout the C passes read and write: anything else is an error here, not a wild write there."""
    n, blocks = p.numel(), -(-p.numel() // BLOCK)
    want = [
        ("param", p, torch.float32, n), ("grad", g, torch.float32, n), ("state1", state1, torch.uint8, n),
        ("state2", state2, torch.uint8, n), ("absmax1", absmax1, torch.float32, blocks),
        ("absmax2", absmax2, torch.float32, blocks), ("qmap1", qmap1, torch.float32, 256),
        ("qmap2", qmap2, torch.float32, 256),
    ]  # fmt: skip
    for name, t, dtype, numel in want:
        if t.device.type != "cpu" or t.dtype != dtype or t.numel() != numel or not t.is_contiguous():
            raise ValueError(
                f"fused 8-bit AdamW update: {name} must be a contiguous {dtype} CPU tensor of {numel} elements "
                f"(a parameter of {n}); got {t.dtype} on {t.device}, {t.numel()} elements"
                + ("" if t.is_contiguous() else ", not contiguous")
            )


@torch.no_grad()
def fused_update(
    g: torch.Tensor,
    p: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    lr: float,
    qmap1: torch.Tensor,
    qmap2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    weight_decay: float,
    gnorm_scale: float = 1.0,
) -> None:
    """bitsandbytes' `optimizer_update_8bit_blockwise("adam", ...)` on contiguous fp32 CPU tensors, in place."""
    _check(g, p, state1, state2, qmap1, qmap2, absmax1, absmax2)
    lib = _load()
    if lib is None:
        raise RuntimeError("the fused 8-bit AdamW update is not built (see the warning above); use bitsandbytes'")
    n, threads = p.numel(), torch.get_num_threads()
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    decay, step_size = 1.0 - lr * weight_decay, -lr / correction1
    lut1, lut2 = _lut(qmap1), _lut(qmap2)
    m, v, root = _buffers(min(SLICE, n))
    ptr = [t.data_ptr() for t in (g, p, state1, state2, absmax1, absmax2, qmap1, qmap2, lut1, lut2, m, v, root)]
    g_, p_, s1_, s2_, a1_, a2_, q1_, q2_, l1_, l2_, m_, v_, root_ = ptr
    for start in range(0, n, SLICE):
        count = min(SLICE, n - start)
        lib.muse_adamw8bit_moments(
            g_, s1_, s2_, a1_, a2_, q1_, q2_, l1_, l2_, n, start, count,
            beta1, 1.0 - beta1, beta2, 1.0 - beta2, gnorm_scale, threads, m_, v_,
        )  # fmt: skip
        torch.sqrt(v[:count], out=root[:count])
        lib.muse_adamw8bit_params(
            p_ + 4 * start, m_, root_, count, correction2, eps, weight_decay > 0.0, decay, step_size, threads
        )


@functools.cache
def optimizer_class() -> type:
    """`AdamW8bit`: bitsandbytes' AdamW8bit, whose update of 8-bit fp32 parameters on the CPU is `fused_update`.
    Built on first use, so that importing this module does not import bitsandbytes."""
    import bitsandbytes as bnb  # optional heavy dependency: only with --use_8bit_adam

    class AdamW8bit(bnb.optim.AdamW8bit):
        def update_step(self, group, p, gindex, pindex):
            state = self.state[p]
            config = self.get_config(gindex, pindex, group)
            fusable = (
                p.device.type == "cpu"
                and p.dtype == torch.float32
                and p.grad.dtype == torch.float32
                and state["state1"].dtype == torch.uint8
                and config["max_unorm"] == 0.0
                and not config["skip_zeros"]
                and available()
            )
            if not fusable:
                return super().update_step(group, p, gindex, pindex)
            p.data = p.data.contiguous()  # as bitsandbytes' update_step
            p.grad = p.grad.contiguous()
            state["step"] += 1
            beta1, beta2 = config["betas"][:2]
            fused_update(
                p.grad, p.data, state["state1"], state["state2"], beta1, beta2, config["eps"], state["step"],
                config["lr"], state["qmap1"], state["qmap2"], state["absmax1"], state["absmax2"],
                config["weight_decay"],
            )  # fmt: skip

    AdamW8bit.__module__ = __name__
    return AdamW8bit


def __getattr__(name: str):
    if name == "AdamW8bit":  # train.adamw8bit.AdamW8bit, built (and bitsandbytes imported) when first asked for
        return optimizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
