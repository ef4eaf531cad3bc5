"""Our pipeline against diffusers' AmusedPipeline, timed side by side in one process on the same random full-size
weights (the published amused-256 / amused-512 configs), with the published sampling settings (12 steps, guidance 10).

For every (layout, batch, variant) it reports:
  end to end  one pipeline call: text encoding, the 12-step decoding loop (two U-ViT rows per image: guidance), the
              VQ decode and the conversion to a numpy image (median of --reps calls after a warm-up call; the two
              pipelines' calls alternate, so that a slow spell of a shared machine hits both)
  per part    text encoding and VQ decode (timed inside that call), decoding loop = the rest
  peak memory working memory of the call above the weights: CUDA's peak allocation, or on the CPU the process's peak
              resident memory (VmHWM, reset before the call) minus its resident memory before the call
  tokens      whether our tokens equal diffusers' in that call (same generator)
Variants: eager; `--compile` adds torch.compile on each transformer (diffusers: `transformer.compile()`, ours:
`Pipeline.compile_transformer()`), and on a GPU ours with CUDA-graph replay (`Pipeline.enable_cuda_graphs()`).

It also writes the physical limit: FLOPs per image of each part (counted by torch's FlopCounterMode on meta-device
models), the machine's measured dense-GEMM rate in the benchmark's dtype, and the fraction of that rate each end-to-end
time reaches (FLOPs / time / GEMM rate).

    python benchmarks/speed.py --device cpu --layouts 256 --batches 1                 # the CPU goal (fp32)
    python benchmarks/speed.py --device cuda --dtype float16 --compile               # GPU, 256 and 512, batch 1 and 8
    python benchmarks/speed.py --tiny                                                 # a 1-minute smoke test

Writes <out>/speed_<machine>.md (the table) and the end-to-end times as a plot, .png and .svg (the text form, which
the repository keeps and README shows).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import re
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

PROMPT = "a photo of a red fox in the snow"
CLIP_256 = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


# --- the two pipelines on the same weights ---------------------------------------------------------------------------
def configs(layout: str, tiny: bool):
    from uvit import UViTConfig
    from vqgan import VQGANConfig

    if tiny:
        return UViTConfig.tiny(downsample=layout == "512", upsample=layout == "512"), VQGANConfig.tiny(), CLIP_TINY
    return (UViTConfig.amused_256() if layout == "256" else UViTConfig.amused_512()), VQGANConfig.amused(), CLIP_256


def build(layout: str, device: torch.device, dtype: torch.dtype, tokenizer_dir: str, tiny: bool):
    """diffusers' AmusedPipeline with random weights, and ours converted from the very same tensors."""
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    import convert
    from muse import Pipeline

    ucfg, vcfg, clip = configs(layout, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = UVit2DModel(**ucfg.to_diffusers_dict()).to(dtype).eval()
        vq = VQModel(**vcfg.to_diffusers_dict()).to(dtype).eval()
        text_encoder = (
            CLIPTextModelWithProjection(
                CLIPTextConfig(vocab_size=49408, hidden_act="quick_gelu", eos_token_id=2, **clip)
            )
            .to(dtype)
            .eval()
        )
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ref = AmusedPipeline(
        vqvae=vq,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        scheduler=AmusedScheduler(mask_token_id=ucfg.mask_token_id),
    )
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline(
        convert.uvit_from_diffusers(dict(transformer.config), transformer.state_dict()),
        convert.vqgan_from_diffusers(dict(vq.config), vq.state_dict()),
        text_encoder,
        tokenizer,  # the same CLIP module: text encoding is not where the two differ
    )
    return ref, ours


# --- measuring one call ------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartTimer:
    """Wraps the text encoder's forward and the VQ-GAN's decode of one pipeline to time them inside a call (one device
    sync at each boundary) and keep the token ids handed to the decoder (B, h*w)."""

    def __init__(self, text_encoder, vqvae, device):
        self.device, self.seconds, self.tokens = device, {"text": 0.0, "vq": 0.0}, None
        self._restore: list = []
        self._patch(text_encoder, "forward", "text")
        self._patch(vqvae, "decode", "vq")

    def _patch(self, module, name: str, part: str) -> None:
        inner = getattr(module, name)

        def timed(*args, **kwargs):
            sync(self.device)
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(self.device)
            self.seconds[part] += time.perf_counter() - t
            if part == "vq":
                self.tokens = args[0].detach().reshape(args[0].shape[0], -1).cpu()
            return out

        setattr(module, name, timed)  # an instance attribute: shadows the class method
        self._restore.append((module, name))

    def remove(self) -> None:
        for module, name in self._restore:
            delattr(module, name)


def _status_kb(field_name: str) -> int:
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


@contextlib.contextmanager
def peak_memory(device: torch.device, result: dict):
    """result["peak_gb"]: the working memory of the block above what was resident before it."""
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield
        result["peak_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    else:
        base = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak resident set) to the current RSS
        yield
        result["peak_gb"] = (_status_kb("VmHWM") - base) / 2**20


@dataclass
class Row:
    layout: str
    batch: int
    variant: str
    seconds: dict[str, float] = field(default_factory=dict)  # per implementation: end to end (median)
    parts: dict[str, dict[str, float]] = field(default_factory=dict)
    peak_gb: dict[str, float] = field(default_factory=dict)
    tokens_equal: bool | None = None


@dataclass
class Sample:
    seconds: float
    parts: dict[str, float]
    peak_gb: float
    tokens: torch.Tensor


def measure_once(call, pipe, device) -> Sample:
    """One timed call, with its parts timed by a PartTimer installed for this call only (the two pipelines share
    one text encoder module)."""
    timer = PartTimer(pipe.text_encoder, pipe.vqvae, device)
    mem: dict = {}
    try:
        with peak_memory(device, mem):
            sync(device)
            t = time.perf_counter()
            call(None)
            sync(device)
            seconds = time.perf_counter() - t
    finally:
        timer.remove()
    return Sample(seconds, dict(timer.seconds), mem["peak_gb"], timer.tokens)


def bench(ref, ours, layout: str, batch: int, variant: str, device, reps: int) -> Row:
    row = Row(layout, batch, variant)
    prompts = [PROMPT] * batch

    def gen():
        return torch.Generator(device).manual_seed(0)

    def run_ref(steps):
        kwargs = {"num_inference_steps": steps} if steps else {}
        ref(prompts, generator=gen(), output_type="np", **kwargs)

    def run_ours(steps):
        kwargs = {"num_inference_steps": steps} if steps else {}
        ours(prompts, generator=gen(), output_type="np", progress_bar=False, **kwargs)

    impls = [("diffusers", run_ref, ref), ("ours", run_ours, ours)]
    if variant == "CUDA graphs":
        impls = impls[1:]  # diffusers has no graph replay of its own: compare against its compiled/eager rows
    samples: dict[str, list[Sample]] = {name: [] for name, _, _ in impls}
    for _name, call, _ in impls:  # warm-up: allocator, kernels/plans, and the compilation when compiled
        call(2 if variant == "eager" else None)
    for _ in range(reps):  # interleaved, so that a slow spell of a shared machine hits both alike
        for name, call, pipe in impls:
            samples[name].append(measure_once(call, pipe, device))
    for name, runs in samples.items():
        row.seconds[name] = statistics.median(r.seconds for r in runs)
        text, vq = (statistics.median(r.parts[k] for r in runs) for k in ("text", "vq"))
        row.parts[name] = {"text": text, "loop": row.seconds[name] - text - vq, "vq": vq}
        row.peak_gb[name] = max(r.peak_gb for r in runs)
        print(
            f"  {layout} batch {batch} {variant:<12} {name:<9} "
            + " ".join(f"{r.seconds:.3f}" for r in runs)
            + f" s (median {row.seconds[name]:.3f}); parts "
            + " ".join(f"{k} {v:.3f}" for k, v in row.parts[name].items())
            + f"; peak +{row.peak_gb[name]:.2f} GB",
            flush=True,
        )
    if len(samples) == 2:
        row.tokens_equal = all(torch.equal(a.tokens, b.tokens) for a, b in zip(samples["diffusers"], samples["ours"]))
    return row


# --- the physical limit -----------------------------------------------------------------------------------------------
def flops_per_image(layout: str, tiny: bool, steps: int = 12) -> dict[str, float]:
    """FLOPs per generated image (batch 1, guidance: two U-ViT rows per step), counted on meta-device models."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from uvit import UViT
    from vqgan import VQGAN

    ucfg, vcfg, clip = configs(layout, tiny)
    with torch.device("meta"):
        uvit, vq = UViT(ucfg), VQGAN(vcfg)
        text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_act="quick_gelu", **clip))
    grid = (16 if layout == "256" else 32) // (4 if tiny else 1)  # token grid side: the published 256 / 512 px
    meta = dict(device="meta")

    def count(fn) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return float(counter.get_total_flops())

    text = torch.zeros(2, 77, ucfg.encoder_hidden_size, **meta)
    pooled, micro = torch.zeros(2, ucfg.cond_embed_dim, **meta), torch.zeros(2, 5, **meta)
    ids = torch.zeros(2, grid, grid, dtype=torch.long, **meta)
    prepare = count(lambda: uvit.prepare(text, pooled, micro))
    cond = uvit.prepare(text, pooled, micro)
    step = count(lambda: uvit.forward_prepared(ids, cond))
    z = torch.zeros(1, vcfg.latent_channels, grid, grid, **meta)
    return {
        "text": count(lambda: text_encoder(torch.zeros(2, 77, dtype=torch.long, **meta))),  # prompt + empty prompt
        "loop": prepare + steps * step,
        "vq": count(lambda: vq.decode_latents(z)),
    }


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """The machine's measured dense matrix-multiply rate (FLOP/s) in `dtype`: the practical ceiling of these models,
    whose time is mostly GEMMs."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 5
    rates = []
    for _ in range(3):  # the best of three: the ceiling, on a machine whose speed may vary
        (a @ b)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        rates.append(2 * n**3 * reps / (time.perf_counter() - t))
    return max(rates)


# --- report -------------------------------------------------------------------------------------------------------------
def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return f"{model.group(1) if model else platform.processor()}, {torch.get_num_threads()} threads"


def write_report(rows: list[Row], flops: dict, rate: float, device, dtype, args, out: Path) -> None:
    slug = re.sub(r"[^a-z0-9]+", "_", machine_name(device).lower()).strip("_")[:40]
    md, png = (
        out / f"speed_{slug}_{str(dtype).split('.')[-1]}.md",
        out / f"speed_{slug}_{str(dtype).split('.')[-1]}.png",
    )
    lines = [
        f"# Speed: ours vs diffusers, {machine_name(device)}",
        "",
        f"torch {torch.__version__}, {str(dtype).split('.')[-1]}, {args.steps} steps, guidance 10, one process, the same "
        f"random weights; median of {args.reps} calls after a warm-up. `python benchmarks/speed.py "
        f"{' '.join(args.argv)}`",
        "",
        "| layout | batch | variant | diffusers (s) | ours (s) | ours / diffusers | ours: text / loop / VQ (s) | "
        "diffusers: text / loop / VQ (s) | peak extra GB (diffusers / ours) | tokens equal | ours: % of GEMM rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, o = r.seconds.get("diffusers"), r.seconds["ours"]

        def fmt_parts(p):
            return " / ".join(f"{p[k]:.3f}" for k in ("text", "loop", "vq")) if p else "-"

        per_image = sum(flops[r.layout].values()) * r.batch
        lines.append(
            f"| {r.layout} | {r.batch} | {r.variant} | {f'{d:.3f}' if d else '-'} | {o:.3f} | "
            f"{f'{o / d:.2f}' if d else '-'} | {fmt_parts(r.parts['ours'])} | {fmt_parts(r.parts.get('diffusers'))} | "
            f"{r.peak_gb.get('diffusers', float('nan')):.2f} / {r.peak_gb['ours']:.2f} | "
            f"{'-' if r.tokens_equal is None else r.tokens_equal} | {100 * per_image / o / rate:.0f}% |"
        )
    lines += [
        "",
        f"Measured dense GEMM rate ({args.gemm_note}): {rate / 1e12:.2f} TFLOP/s.",
        "",
        "FLOPs per image (batch 1; the loop runs two U-ViT rows per step for guidance):",
        "",
        "| layout | text encoder | decoding loop (12 U-ViT steps + prepare) | VQ decode | total |",
        "|---|---|---|---|---|",
    ]
    for layout, f in flops.items():
        lines.append(
            f"| {layout} | {f['text'] / 1e9:.1f} G | {f['loop'] / 1e9:.1f} G | {f['vq'] / 1e9:.1f} G | "
            f"{sum(f.values()) / 1e9:.1f} G |"
        )
    md.write_text("\n".join(lines) + "\n")
    plot(rows, machine_name(device), dtype, png)
    print("\n".join(lines))
    print(f"\nwrote {md}, {png} and {png.with_suffix('.svg')}")


def plot(rows: list[Row], machine: str, dtype, path: Path) -> None:
    """Bars of end-to-end seconds per row, written to `path` (PNG) and beside it as SVG (no date: reruns diff clean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.layout} px\nbatch {r.batch}\n{r.variant}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(rows)), 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r.seconds.get("diffusers", 0) for r in rows], 0.4, label="diffusers")
    ax.bar([x + 0.2 for x in xs], [r.seconds["ours"] for r in rows], 0.4, label="ours")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("seconds per call (end to end)")
    ax.set_title(f"{machine}, {str(dtype).split('.')[-1]}", fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    with matplotlib.rc_context({"svg.hashsalt": "muse", "svg.fonttype": "none"}):
        fig.savefig(path.with_suffix(".svg"), metadata={"Date": None})
    plt.close(fig)


def main(argv=None) -> None:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (the CPU default), float16 (the GPU default) or bfloat16")
    p.add_argument("--layouts", nargs="+", default=["256", "512"], choices=["256", "512"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--compile", action="store_true", help="add the torch.compile rows (and CUDA graphs on a GPU)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per implementation and row")
    p.add_argument("--tiny", action="store_true", help="tiny models: a smoke test of this script")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.steps = 12
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from convert.clip_tokenizer import write_clip_tokenizer_files

    variants = ["eager"] + (["compiled"] + (["CUDA graphs"] if device.type == "cuda" else []) if args.compile else [])
    rows, flops = [], {}
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer_files(tok_dir)  # offline, from open_clip's bundled BPE merges
        for layout in args.layouts:
            flops[layout] = flops_per_image(layout, args.tiny)
            ref, ours = build(layout, device, dtype, tok_dir, args.tiny)
            for variant in variants:
                if variant == "compiled":
                    ref.transformer.compile()
                    ours.compile_transformer()
                elif variant == "CUDA graphs":
                    ours.enable_cuda_graphs()
                for batch in args.batches:
                    rows.append(bench(ref, ours, layout, batch, variant, device, args.reps))
            del ref, ours
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rate = gemm_rate(device, dtype)
    args.gemm_note = f"{str(dtype).split('.')[-1]} square matmul, measured by this script"
    write_report(rows, flops, rate, device, dtype, args, out)


if __name__ == "__main__":
    main()
