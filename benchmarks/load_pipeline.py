"""Load time and peak memory of the full aMUSEd-256 pipeline from a local folder: ours (`convert.load_components`)
against diffusers' `AmusedPipeline.from_pretrained`. Not a test.

Each measurement runs in a fresh Python process (so imports, allocator state and peak RSS are its own); one
unmeasured warm-up run per loader first puts the files in the page cache, so both read from memory, not disk.
Reported per loader (median of --runs):
  import    seconds to import the library (torch, transformers, and diffusers for theirs)
  load      seconds for the load call itself
  touch     seconds to then read every weight once (our tensors are memory-mapped: the pages are read on first use,
            so `load + touch` is the fair end-to-end comparison)
  peak RSS  the process's maximum resident memory after load + touch (file-backed mapped pages included)
  tokenizer seconds of one more `CLIPTokenizer.from_pretrained` of the folder's tokenizer: both loaders make this
            call, so it is a floor under both load times (parsing tokenizer.json dominates it)

    python benchmarks/load_pipeline.py [--folder DIR] [--runs 3] [--variant fp16 --dtype float16]

Without --folder, a folder of the published amused-256 layout with random weights is written to a temporary
directory first (with our exporter; about 2.4 GB of fp32 files).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --- the child process: one measurement ----------------------------------------------------------------------------


def child(loader: str, folder: str, variant: str | None, dtype_name: str) -> dict:
    import resource

    t0 = time.perf_counter()
    import torch

    dtype = getattr(torch, dtype_name)
    if loader == "ours":
        sys.path.insert(0, str(REPO))
        import transformers.models.clip.modeling_clip  # noqa: F401  (our text encoder's class: part of the import cost)

        import convert

        t1 = time.perf_counter()
        c = convert.load_components(folder, dtype=dtype, variant=variant)
        modules = [c.transformer, c.vqvae, c.text_encoder]
    else:
        import warnings

        warnings.filterwarnings("ignore")
        import transformers.models.clip.modeling_clip  # noqa: F401  (as above: imported before the clock starts)
        from diffusers import AmusedPipeline
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()
        t1 = time.perf_counter()
        p = AmusedPipeline.from_pretrained(folder, torch_dtype=dtype, variant=variant)
        modules = [p.transformer, p.vqvae, p.text_encoder]
    t2 = time.perf_counter()
    with torch.no_grad():  # read every weight once
        total = sum(float(t.float().sum()) for m in modules for t in m.state_dict().values())
    t3 = time.perf_counter()
    from transformers import CLIPTokenizer  # the call both loaders make for the tokenizer: a shared floor

    CLIPTokenizer.from_pretrained(str(Path(folder) / "tokenizer"))
    t4 = time.perf_counter()
    n = sum(p.numel() for m in modules for p in m.parameters())
    return {
        "import_s": t1 - t0,
        "load_s": t2 - t1,
        "touch_s": t3 - t2,
        "tokenizer_s": t4 - t3,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "parameters": n,
        "checksum": total,
    }


# --- the parent: folder, warm-up, runs, table ----------------------------------------------------------------------


def make_folder(directory: Path, variant: str | None = None) -> Path:
    """A diffusers amused-256 folder of random weights, written by our exporter (no diffusers needed)."""
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    import convert
    from convert.clip_tokenizer import offline_clip_tokenizer
    from uvit import UViT, UViTConfig
    from vqgan import VQGAN, VQGANConfig

    print(f"writing a random full-size amused-256 folder to {directory} ...", file=sys.stderr)
    torch.manual_seed(0)
    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    transformer = UViT(UViTConfig.amused_256())
    components = convert.Components(
        transformer=transformer,
        vqvae=VQGAN(VQGANConfig.amused()),
        text_encoder=CLIPTextModelWithProjection(text),
        tokenizer=offline_clip_tokenizer(),
        scheduler_config={"mask_token_id": transformer.config.mask_token_id, "masking_schedule": "cosine"},
    )
    convert.export_diffusers(components, directory)
    if variant:
        convert.export_diffusers(components, directory, variant=variant)
    return directory


def run_child(loader: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", loader, "--folder", str(args.folder), "--dtype", args.dtype]
    if args.variant:
        cmd += ["--variant", args.variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{loader} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--folder", type=Path, default=None, help="a local amused-256 diffusers pipeline folder")
    p.add_argument("--make", type=Path, default=None, help="write the random full-size folder here and keep it")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--variant", default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, str(args.folder), args.variant, args.dtype)))
        return

    tmp = None
    if args.make is not None:
        args.folder = make_folder(args.make, args.variant)
    elif args.folder is None:
        tmp = tempfile.TemporaryDirectory(prefix="amused-256-random-")
        args.folder = make_folder(Path(tmp.name), args.variant)
    results = {}
    for loader in ("ours", "diffusers"):
        print(f"{loader}: warm-up run ...", file=sys.stderr)
        warm = run_child(loader, args)
        runs = []
        for i in range(args.runs):
            runs.append(run_child(loader, args))
            print(f"{loader} run {i + 1}: {runs[-1]}", file=sys.stderr)
        results[loader] = {
            k: statistics.median(r[k] for r in runs)
            for k in ("import_s", "load_s", "touch_s", "tokenizer_s", "peak_rss_gb")
        }
        results[loader]["parameters"] = warm["parameters"]
        results[loader]["checksum"] = warm["checksum"]
    if results["ours"]["parameters"] != results["diffusers"]["parameters"]:
        print("WARNING: the two loaders loaded different parameter counts", file=sys.stderr)

    print(f"\nfolder: {args.folder}  dtype: {args.dtype}  variant: {args.variant}  runs: {args.runs} (median)")
    print(
        f"{'loader':<10}{'import s':>10}{'load s':>10}{'touch s':>10}{'load+touch s':>14}{'peak RSS GB':>13}"
        f"{'params':>15}{'tokenizer s':>13}"
    )
    for loader, r in results.items():
        print(
            f"{loader:<10}{r['import_s']:>10.2f}{r['load_s']:>10.2f}{r['touch_s']:>10.2f}"
            f"{r['load_s'] + r['touch_s']:>14.2f}{r['peak_rss_gb']:>13.2f}{r['parameters']:>15,}{r['tokenizer_s']:>13.2f}"
        )
    o, d = results["ours"], results["diffusers"]
    print(
        f"\nspeed-up, load call: {d['load_s'] / o['load_s']:.1f}x; load + touch: "
        f"{(d['load_s'] + d['touch_s']) / (o['load_s'] + o['touch_s']):.1f}x; "
        f"import + load + touch: {(d['import_s'] + d['load_s'] + d['touch_s']) / (o['import_s'] + o['load_s'] + o['touch_s']):.1f}x"
    )
    tok = (o["tokenizer_s"] + d["tokenizer_s"]) / 2
    print(
        f"without the shared tokenizer load (~{tok:.2f} s): {(d['load_s'] - tok) / max(o['load_s'] - tok, 1e-6):.1f}x"
    )
    print(f"peak RSS: ours {o['peak_rss_gb']:.2f} GB vs diffusers {d['peak_rss_gb']:.2f} GB")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
