"""Quick GPU comparison (one run, same machine): our pipeline vs diffusers' AmusedPipeline, random full-size weights,
12 steps, guidance 10, end to end (text, decoding loop, VQ decode). fp16. Writes a markdown table to --out.

Variants: diffusers eager; ours eager; ours with the U-ViT forward captured in a CUDA graph (static shapes).
Usage: python benchmarks/gpu_quick.py --tokenizer DIR --out results.md
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def build(layout: str, device, dtype, tokenizer_dir: str, tiny: bool = False):
    from diffusers import AmusedPipeline, AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    import convert
    from muse import Pipeline
    from uvit import UViTConfig
    from vqgan import VQGANConfig

    ucfg = UViTConfig.amused_256() if layout == "256" else UViTConfig.amused_512()
    vcfg = VQGANConfig.amused()
    clip = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
    if tiny:  # a smoke test of this script on a CPU
        ucfg = UViTConfig.tiny(downsample=layout == "512", upsample=layout == "512")
        vcfg = VQGANConfig.tiny()
        clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    with torch.device(device):
        transformer = UVit2DModel(**ucfg.to_dict()).to(dtype).eval()
        vq = VQModel(**vcfg.to_diffusers_dict()).to(dtype).eval()
        te = CLIPTextModelWithProjection(
            CLIPTextConfig(vocab_size=49408, hidden_act="quick_gelu", eos_token_id=2, **clip)
        ).to(dtype).eval()
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    ref = AmusedPipeline(vqvae=vq, tokenizer=tok, text_encoder=te, transformer=transformer,
                         scheduler=AmusedScheduler(mask_token_id=ucfg.mask_token_id))
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline(
        convert.uvit_from_diffusers(dict(transformer.config), transformer.state_dict()),
        convert.vqgan_from_diffusers(dict(vq.config), vq.state_dict()),
        te, tok,
    )
    return ref, ours


class GraphedForward:
    """The U-ViT's forward_channels_last replayed from a CUDA graph captured once per input shape."""

    def __init__(self, model):
        self.forward, self.graphs = model.forward_channels_last, {}  # the eager method, bound before any patching

    def __call__(self, ids, ehs, pooled, micro):
        key = (tuple(ids.shape), tuple(ehs.shape))
        if key not in self.graphs:
            static = [t.clone() for t in (ids, ehs, pooled, micro)]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.forward(*static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self.forward(*static)
            self.graphs[key] = (g, static, out)
        g, static, out = self.graphs[key]
        for dst, src in zip(static, (ids, ehs, pooled, micro)):
            dst.copy_(src)
        g.replay()
        return out


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    fn()
    _sync()
    ts = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a smoke test of this script")
    args = p.parse_args()
    device, dtype = (torch.device("cpu"), torch.float32) if args.tiny else (torch.device("cuda"), torch.float16)
    name = "cpu" if args.tiny else torch.cuda.get_device_name()
    rows = ["| layout | batch | diffusers eager (ms) | ours eager (ms) | ours CUDA graph (ms) | tokens equal (eager) |", "|---|---|---|---|---|---|"]
    with open(args.out, "w") as f:
        f.write(f"{name} torch {torch.__version__} fp16, 12 steps, guidance 10\n\n")
    for layout in ("256", "512"):
        ref, ours = build(layout, device, dtype, args.tokenizer, args.tiny)
        for batch in (1, 8):
            prompts = ["a photo of a cat"] * batch
            gen = lambda: torch.Generator(device).manual_seed(0)
            t_ref = timed(lambda: ref(prompts, generator=gen(), output_type="np"), args.reps)
            t_ours = timed(lambda: ours(prompts, generator=gen(), output_type="np", progress_bar=False), args.reps)
            a = ref(prompts, generator=gen(), output_type="latent").images
            b = ours(prompts, generator=gen(), output_type="latent", progress_bar=False)
            same = torch.equal(a.cpu(), b.cpu())
            graphed = GraphedForward(ours.transformer)
            eager = ours.transformer.forward_channels_last
            try:
                if args.tiny:
                    raise RuntimeError("no CUDA graphs on the CPU")
                ours.transformer.forward_channels_last = graphed
                t_graph = timed(lambda: ours(prompts, generator=gen(), output_type="np", progress_bar=False), args.reps)
            except Exception as e:  # report, do not lose the other numbers
                t_graph = float("nan")
                print("graph failed:", repr(e))
            finally:
                ours.transformer.forward_channels_last = eager
            row = f"| {layout} | {batch} | {t_ref*1e3:.1f} | {t_ours*1e3:.1f} | {t_graph*1e3:.1f} | {same} |"
            rows.append(row)
            print(row, flush=True)
            with open(args.out, "a") as f:
                f.write(row + "\n")
        del ref, ours
        torch.cuda.empty_cache()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
