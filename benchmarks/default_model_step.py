"""Where one training step of a default-model recipe's U-ViT goes, and what a sample costs: the forward's FLOPs per
part (torch's FLOP counter) and the seconds per sample of a whole step (forward, backward, AdamW) at several batch
sizes, measured one after the other in this process on random inputs. Not a test.

    python benchmarks/default_model_step.py [--recipe cpu] [--batches 32 64 128] [--threads 2] [--text-length 77]
    python benchmarks/default_model_step.py --compile [--alternations 3]    # eager against torch.compile, A B A B
    python benchmarks/default_model_step.py --variants [--alternations 3]   # text length x bf16 x compile, alternating

docs/default_model.md ("What would close it") quotes what it printed on the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from train.default_model import RECIPES
from train.loop import compiled as compile_step
from uvit import UViT


def random_inputs(cfg, batch: int, text_length: int):
    ids = torch.randint(cfg.vocab_size, (batch, cfg.sample_size, cfg.sample_size))
    text = torch.randn(batch, text_length, cfg.encoder_hidden_size)
    pooled = torch.randn(batch, cfg.cond_embed_dim)
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]]).expand(batch, -1)
    return ids, text, pooled, micro


def forward_flop_shares(model: UViT, inputs) -> tuple[float, dict[str, float]]:
    """(forward GFLOP, share of the forward's FLOPs per part)."""
    counter = FlopCounterMode(depth=4, display=False)
    with counter, torch.no_grad():
        model(*inputs)
    total, counts = counter.get_total_flops(), counter.get_flop_counts()

    def share(*names: str) -> float:
        return sum(sum(counts.get(n, {}).values()) for n in names) / total

    layers = range(len(model.layers))
    return total / 1e9, {
        "transformer layers": share(*(f"UViT.layers.{i}" for i in layers)),
        "  their GEGLU feed-forwards": share(*(f"UViT.layers.{i}.ff" for i in layers)),
        "  their cross-attention keys and values": share(
            *(f"UViT.layers.{i}.cross_attn.{p}" for i in layers for p in ("k", "v"))
        ),
        "conv stages": share("UViT.down", "UViT.up"),
        "head": share("UViT.head"),
    }


def seconds_per_step(model: UViT, inputs, steps: int, bf16: bool = False) -> float:
    """Mean seconds of `steps` whole training steps (the forward under CPU bf16 autocast when `bf16`), after two
    warm-up steps."""
    cfg = model.config
    optimizer = torch.optim.AdamW(model.parameters())
    ids = inputs[0]
    labels = ids.clamp(max=cfg.codebook_size - 1)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(*inputs)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def compiled_against_eager(model: UViT, inputs, steps: int, alternations: int) -> dict:
    """Seconds to compile the step (its first call), then seconds per step of the eager and the compiled model,
    alternating (eager, compiled, eager, ...) so that a drifting machine slows both alike."""
    compiled = compile_step(model, torch.device("cpu"))  # as the training loop compiles it
    start = time.perf_counter()
    seconds_per_step(compiled, inputs, 1)  # compiles forward and backward in its warm-up steps
    compile_s = time.perf_counter() - start
    eager, fused = [], []
    for _ in range(alternations):
        eager.append(seconds_per_step(model, inputs, steps))
        fused.append(seconds_per_step(compiled, inputs, steps))
    return {"compile_seconds": compile_s, "eager": eager, "compiled": fused}


# (text tokens, bf16 autocast, compiled): the earlier CPU recipe, then its changes one by one and together
VARIANTS = [(77, False, False), (16, False, False), (16, True, False), (16, False, True), (16, True, True)]


def time_variants(cfg, batch: int, steps: int, alternations: int) -> dict:
    """Seconds per step of each of VARIANTS (a fresh U-ViT each), timed in turn `alternations` times; each compiled
    one is compiled by a first step before any timing."""
    runs = {}
    for length, bf16, compile_it in VARIANTS:
        model = UViT(cfg)
        forward = compile_step(model, torch.device("cpu")) if compile_it else model
        runs[(length, bf16, compile_it)] = (forward, random_inputs(cfg, batch, length), bf16)
    for forward, inputs, bf16 in runs.values():
        seconds_per_step(forward, inputs, 1, bf16)
    times = {v: [] for v in VARIANTS}
    for _ in range(alternations):
        for v, (forward, inputs, bf16) in runs.items():
            times[v].append(seconds_per_step(forward, inputs, steps, bf16))
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text-length", type=int, default=77)
    p.add_argument("--samples", type=int, default=320, help="samples timed per batch size (at least 3 steps)")
    p.add_argument("--compile", action="store_true", help="time torch.compile's step against the eager one instead")
    p.add_argument("--alternations", type=int, default=3, help="with --compile: eager / compiled pairs")
    p.add_argument("--variants", action="store_true", help="time text length x bf16 autocast x compile instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = RECIPES[args.recipe]().uvit_config
    model = UViT(cfg)
    if args.variants:
        batch = args.batches[0]
        times = time_variants(cfg, batch, max(3, args.samples // batch), args.alternations)
        print(f"{args.recipe} recipe's U-ViT, batch {batch}, {args.threads} threads: seconds per step")
        for (length, bf16, compile_it), ts in times.items():
            name = (
                f"{length} text tokens, {'bf16 autocast' if bf16 else 'fp32'}, {'compiled' if compile_it else 'eager'}"
            )
            print(f"  {name:<40}" + "  ".join(f"{t:.3f}" for t in ts) + f"   median {sorted(ts)[len(ts) // 2]:.3f}")
        return
    if args.compile:
        batch = args.batches[0]
        r = compiled_against_eager(
            model, random_inputs(cfg, batch, args.text_length), max(3, args.samples // batch), args.alternations
        )
        print(f"{args.recipe} recipe's U-ViT, batch {batch}: compiling took {r['compile_seconds']:.1f} s")
        for e, c in zip(r["eager"], r["compiled"]):
            print(f"eager {e:.3f} s per step, compiled {c:.3f} s per step: compiled / eager {c / e:.2f}")
        e, c = sorted(r["eager"])[len(r["eager"]) // 2], sorted(r["compiled"])[len(r["compiled"]) // 2]
        print(f"medians: eager {e:.3f}, compiled {c:.3f} s per step; compiled / eager {c / e:.2f}")
        return

    gflop, shares = forward_flop_shares(model, random_inputs(cfg, args.batches[0], args.text_length))
    print(f"{args.recipe} recipe's U-ViT, batch {args.batches[0]}: forward {gflop:.2f} GFLOP")
    for name, value in shares.items():
        print(f"  {name:<42}{value:6.1%}")
    for batch in args.batches:
        s = seconds_per_step(model, random_inputs(cfg, batch, args.text_length), max(3, args.samples // batch))
        print(f"batch {batch:>4}: {s:.3f} s per step, {1000 * s / batch:.2f} ms per sample")


if __name__ == "__main__":
    main()
