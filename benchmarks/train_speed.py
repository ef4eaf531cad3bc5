"""Per-step time and peak memory of fine-tuning: `python -m train` beside the reference's own training script
(diffusers' examples/amused/train_amused.py, given by path: nothing of it is imported here), same flags, same
published-layout folder, same images. A benchmark, not a test.

Each run is a fresh process running one implementation with the recipe's flags for N optimizer steps. The per-step
time is (wall time of an N-step run - wall time of a short run) / (N - short), the short run taking one step per
image (batch 1: it reads every image once): loading, the first step's allocations, ours' pre-encoding of the data
and the final save cancel. Runs alternate (ours N, reference N, ours short, reference short, then again) so that a
machine whose speed drifts slows both alike; the table gives the median over the alternations and the spread
(min-max).
Peak memory: the resident-set peak of the N-step runs: the larger of the process's own (its VmHWM, which the child
reads at exit; not the ru_maxrss of os.wait4, which on Linux starts at this parent's peak at the fork) and the peak of the RSS summed over the process and any children (data-loader workers, say), sampled
every 50 ms; and on CUDA, torch.cuda.max_memory_allocated at the process's exit. The models have random weights
(only the shapes matter): a published-layout folder per model is written once under --work_dir by our exporter, beside --images
square images at the resolution whose file names are the prompts (what --instance_data_dir reads, in both scripts).
One image by default: the short run then takes one step (with 4, as the issue first measured, it takes 4).

Rows: the published recipes at batch 1, accumulation 1 (full fine-tune, full + 8-bit AdamW, LoRA; their learning
rates; without gradient checkpointing, which the reference's script crashes on), run with the reference's flags by
both. With those flags ours pre-encodes by itself (VQ tokens and text embeddings computed once, the VQ-GAN and text
encoder freed before training), since the images have a single crop and every run reads them all; see
train.loop.choose_pre_encode. Then what only ours runs: LoRA with --gradient_checkpointing, LoRA with
--no_recompute_attention (ours' LoRA default recomputes the attentions' inputs: this row prices that), and the recipes
with --no_pre_encode, the reference's step op for op (the frozen encoders run in every step).

    python benchmarks/train_speed.py --reference PATH/train_amused.py             # CPU: amused-256 and -512, all rows
    python benchmarks/train_speed.py --reference PATH --models 256 --rows lora --steps 5 --alternations 3
    python benchmarks/train_speed.py --tiny                                        # a tiny model, ours only: a smoke test
    python benchmarks/train_speed.py --profile --rows lora                         # torch.profiler of one step of ours

Results: benchmarks/results/train_speed_<device>.md and .json (with --tiny: train_speed_<device>_tiny.*).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # random_models (the repository itself goes on the path in the parent only: a child
# runs the packages its PYTHONPATH names, which for a baseline are another checkout's)

import random_models  # noqa: E402  (this folder, put on the path above)

# name -> (flags, the reference runs it too). The learning rates of the published recipes (they change no cost).
FULL, FULL_8BIT, LORA = (
    ["--learning_rate", "1e-4"],
    ["--learning_rate", "2e-5", "--use_8bit_adam"],
    ["--learning_rate", "8e-4", "--use_lora"],
)
ROWS = {
    "full": (FULL, True),
    "full-8bit": (FULL_8BIT, True),
    "lora": (LORA, True),
    "lora-gradient-checkpointing": ([*LORA, "--gradient_checkpointing"], False),
    "lora-no-recompute-attention": ([*LORA, "--no_recompute_attention"], False),
    "full-no-pre-encode": ([*FULL, "--no_pre_encode"], False),
    "full-8bit-no-pre-encode": ([*FULL_8BIT, "--no_pre_encode"], False),
    "lora-no-pre-encode": ([*LORA, "--no_pre_encode"], False),
}
# a row only ours runs -> the recipe row whose reference figures it is set beside (the same recipe, plus a flag the
# reference does not have). Not paired within an alternation: the ratio of the two rows' medians.
RECIPE_OF = {
    "lora-gradient-checkpointing": "lora",
    "lora-no-recompute-attention": "lora",
    "full-no-pre-encode": "full",
    "full-8bit-no-pre-encode": "full-8bit",
    "lora-no-pre-encode": "lora",
}
PROMPTS = ["a pixel art character", "a red cube on a table", "a blue ball in the grass", "a yellow sun over the sea"]
PROMPTS += [f"image {i}" for i in range(len(PROMPTS), 64)]
TIME_GOAL = 0.8  # ours / reference, per step
MEMORY_GOAL = {"full": 0.8, "full-8bit": 0.7, "lora": 0.7}  # ours / reference, peak (of the recipe: RECIPE_OF)


# --- the child: one run of one implementation, measured from outside ------------------------------------------------


def run_child(args) -> None:
    """Run ours (`python -m train`) or the reference script in this process, then write its CUDA peak (if any) to
    --peak_file at exit. Nothing else is imported before the training code, so the process is the script's own."""
    import atexit
    import runpy

    def write_peak() -> None:
        peak = None
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            peak = torch.cuda.max_memory_allocated() / 2**20
        Path(args.peak_file).write_text(json.dumps({"cuda_max_allocated_mb": peak, "vm_hwm_mb": own_peak_rss_mb()}))

    atexit.register(write_peak)
    sys.argv = [args.impl] + args.rest
    if args.impl == "ours":
        runpy.run_module("train", run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, str(Path(args.impl).parent))
        runpy.run_path(args.impl, run_name="__main__")


def own_peak_rss_mb() -> float | None:
    """This process's resident-set peak (Linux VmHWM), None where /proc cannot tell. Unlike the ru_maxrss a parent
    reads with wait4, it starts at exec: Linux gives a forked child the parent's peak and keeps it across exec, so
    a benchmark process that had just written a 603M-parameter model lent its own peak to the next runs' ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


# --- the parent -------------------------------------------------------------------------------------------------------


def prepare(model: str, work: Path, tiny: bool, n_images: int = 1) -> tuple[Path, Path, int]:
    """(published-layout folder, image folder, resolution) for the model, written once under `work`: `n_images`
    random square images at the resolution (a single crop each), named by the first prompts."""
    import numpy as np
    from PIL import Image

    suffix = "-tiny" if tiny else ""
    folder = random_models.write_random_model(
        model, work / f"published-amused-{model}{suffix}", published=True, tiny=tiny
    )
    res = random_models.image_resolution(model, tiny)
    images = work / f"images-{res}-{n_images}"
    if not images.is_dir():
        tmp = images.with_name(images.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for p in PROMPTS[:n_images]:
            Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(tmp / f"{p}.png")
        tmp.rename(images)
    return folder, images, res


def flags(row: str, folder: Path, images: Path, res: int, steps: int, out: Path, device: str) -> list[str]:
    cuda = device.startswith("cuda")
    return [
        "--pretrained_model_name_or_path",
        str(folder),
        "--instance_data_dir",
        str(images),
        "--resolution",
        str(res),
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--lr_scheduler",
        "constant",
        "--mixed_precision",
        "fp16" if cuda else "no",
        "--max_train_steps",
        str(steps),
        "--seed",
        "0",
        "--output_dir",
        str(out),
        "--report_to",
        "wandb",  # WANDB_MODE=disabled: no run, no network (the reference's default tracker)
        *ROWS[row][0],
    ]


def measure(impl: str, argv: list[str], work: Path, device: str, timeout: float, repo: Path = REPO) -> dict:
    """One fresh process: wall seconds, its peak RSS (see _wait4) and CUDA peak. `repo`:
    the checkout whose packages `ours` runs (another one for a baseline)."""
    peak_file = work / "peak.json"
    peak_file.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--run_child", "--impl", impl, "--peak_file", str(peak_file), "--", *argv]
    env = {**os.environ, "PYTHONPATH": str(repo), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if not device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = work / "last_run.log"
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=repo, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage, tree_peak = _wait4(proc, timeout)
        except TimeoutError:
            proc.kill()
            proc.wait()
            return {"error": f"timed out after {timeout:.0f} s"}
        seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        print(tail, file=sys.stderr)
        return {"error": f"exit {code}"}
    peak = json.loads(peak_file.read_text()) if peak_file.is_file() else {}
    own = peak.pop("vm_hwm_mb", None)  # its own peak from exec on; ru_maxrss would include this process's at fork
    return {
        "seconds": seconds,
        # its own peak, or its tree's (data-loader workers), summed, if higher
        "peak_rss_mb": max(own if own is not None else usage.ru_maxrss / 1024, tree_peak),
        **{k: v for k, v in peak.items() if v is not None},
    }


def _wait4(proc: subprocess.Popen, timeout: float):
    """Wait for `proc`: (pid, status, rusage, the peak of its process tree's summed RSS in MiB, sampled every 50 ms)."""
    deadline = time.monotonic() + timeout
    tree_peak = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage, tree_peak
        tree_peak = max(tree_peak, tree_rss_mb(proc.pid))
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def tree_rss_mb(root: int) -> float:
    """The resident memory of process `root` and all its descendants, summed (pages they share count once per
    process: an upper bound). Linux /proc; 0 where it cannot be read."""
    total, todo, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):  # it ended meanwhile
            continue
    return total / 2**20


def measure_row(model: str, row: str, impls: dict[str, tuple[str, Path]], args, work: Path) -> dict:
    """Alternating runs of every implementation at N steps and at one step per image; per-step times and peaks per
    alternation."""
    folder, images, res = prepare(model, work, args.tiny, args.images)
    runs = {name: {"long": [], "short": []} for name in impls}
    for alternation in range(args.alternations):
        for length, steps in (("long", args.steps), ("short", args.images)):
            for name, (impl, repo) in impls.items():
                out = work / f"out-{name}"
                subprocess.run(["rm", "-rf", str(out)], check=True)
                argv = flags(row, folder, images, res, steps, out, args.device)
                r = measure(impl, argv, work, args.device, args.timeout, repo)
                print(
                    f"   {model} {row} {name} {steps} step(s), alternation {alternation + 1}: {json.dumps(r)}",
                    flush=True,
                )
                runs[name][length].append(r)
    entries = {n: {"runs": r} for n, r in runs.items()}
    return summarize({"model": model, "row": row, "steps": args.steps, "images": args.images, "impls": entries})


def summarize(result: dict) -> dict:
    """Per implementation, from its runs: the per-step time and the peaks of each alternation (N-step, short pair)."""
    steps, short = result["steps"], images_of(result)
    for entry in result["impls"].values():
        r = entry["runs"]
        for key in ("per_step_s", "peak_rss_mb", "cuda_max_allocated_mb", "errors"):
            entry.pop(key, None)
        pairs = [(lo, sh) for lo, sh in zip(r["long"], r["short"]) if "error" not in lo and "error" not in sh]
        errors = [x["error"] for x in r["long"] + r["short"] if "error" in x]
        if pairs:
            entry["per_step_s"] = [(lo["seconds"] - sh["seconds"]) / (steps - short) for lo, sh in pairs]
            entry["peak_rss_mb"] = [lo["peak_rss_mb"] for lo, _ in pairs]
            cuda = [lo["cuda_max_allocated_mb"] for lo, _ in pairs if "cuda_max_allocated_mb" in lo]
            if cuda:
                entry["cuda_max_allocated_mb"] = cuda
        if errors:
            entry["errors"] = errors
    result["alternations"] = max(len(e["runs"]["long"]) for e in result["impls"].values())
    return result


def images_of(result: dict) -> int:
    """The images of a row's data: its short runs take that many steps."""
    return result.get("images", 1)


def key_of(result: dict) -> tuple:
    return result["model"], result["row"], result["steps"], images_of(result)


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """Earlier results with this invocation's: a row measured again (same model, row, N and images) gets this
    invocation's alternations added to its earlier ones, for every implementation both measured; other rows
    (another N is another row) are kept or added."""
    merged = {key_of(r): r for r in old if r["row"] in ROWS}
    for r in new:
        key = key_of(r)
        prev = merged.get(key)
        if prev is not None:
            for name, entry in r["impls"].items():
                if name in prev["impls"]:
                    for length in ("long", "short"):
                        prev["impls"][name]["runs"][length] += entry["runs"][length]
                else:
                    prev["impls"][name] = entry
            merged[key] = summarize(prev)
        else:
            merged[key] = r
    return sorted(merged.values(), key=lambda r: (r["model"], list(ROWS).index(r["row"]), r["steps"], images_of(r)))


# --- the table ------------------------------------------------------------------------------------------------------


def _median_spread(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def _paired(ours: list[float], other: list[float]) -> str:
    """ours / other: the median of the per-alternation ratios (both ran in the same alternation, under the same
    load), with their range."""
    if not ours or not other:
        return "-"
    return _median_spread([o / f for o, f in zip(ours, other)], ".2f")


def table(results: list[dict]) -> str:
    cuda = any("cuda_max_allocated_mb" in e for r in results for e in r["impls"].values())
    head = [
        "model",
        "row",
        "N",
        "images",
        "alternations",
        "ours s/step",
        "reference s/step",
        "ratio (goal 0.8)",
        "ours peak RSS GiB",
        "reference peak RSS GiB",
        "ratio (goal)",
    ]
    if cuda:
        head += ["ours CUDA max allocated GiB", "reference CUDA max allocated GiB", "ratio"]
    baseline = any("baseline" in r["impls"] for r in results)
    if baseline:
        head += ["baseline s/step", "ours / baseline", "baseline peak RSS GiB", "ours / baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {key_of(r): r for r in results}
    for r in results:
        ours, ref = r["impls"].get("ours", {}), r["impls"].get("reference", {})
        recipe = RECIPE_OF.get(r["row"], r["row"])
        borrowed = not ref and recipe != r["row"]  # the reference's figures of the recipe's own row, if measured
        if borrowed:
            recipe_key = (r["model"], recipe, r["steps"], images_of(r))
            ref = by_key.get(recipe_key, {"impls": {}})["impls"].get("reference", {})
        cells = [f"amused-{r['model']}", r["row"], str(r["steps"]), str(images_of(r)), str(r["alternations"])]
        for key, fmt, scale, goal in (
            ("per_step_s", ".2f", 1, TIME_GOAL),
            ("peak_rss_mb", ".2f", 1024, MEMORY_GOAL.get(recipe)),
        ):
            o = [v / scale for v in ours.get(key, [])]
            f = [v / scale for v in ref.get(key, [])]
            cells.append(_median_spread(o, fmt) if o else ours.get("errors", ["-"])[0])
            cells.append(
                (_median_spread(f, fmt) + (f" ({recipe} row)" if borrowed else ""))
                if f
                else (ref.get("errors", ["-"])[0] if ref else "-")
            )
            if borrowed:  # two rows, run at different times: medians, not paired ratios
                ratio = f"{statistics.median(o) / statistics.median(f):.2f}" if o and f else "-"
            else:
                ratio = _paired(o, f)
            cells.append(ratio + (f" ({goal})" if goal and o and f else ""))
        if cuda:
            o = [v / 1024 for v in ours.get("cuda_max_allocated_mb", [])]
            f = [v / 1024 for v in ref.get("cuda_max_allocated_mb", [])]
            cells += [
                _median_spread(o, ".2f") if o else "-",
                _median_spread(f, ".2f") if f else "-",
                f"{statistics.median(o) / statistics.median(f):.2f}" if o and f else "-",
            ]
        if baseline:
            base = r["impls"].get("baseline", {})
            for key, scale in (("per_step_s", 1), ("peak_rss_mb", 1024)):
                o = [v / scale for v in ours.get(key, [])]
                b = [v / scale for v in base.get(key, [])]
                cells += [_median_spread(b, ".2f") if b else "-", _paired(o, b)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: list[dict], args, out_dir: Path, add: bool) -> tuple[Path, Path]:
    """The markdown and JSON of `results`; with `add`, added to what the files hold (see `merge`)."""
    import torch

    name = f"train_speed_{'cuda' if args.device.startswith('cuda') else 'cpu'}{'_tiny' if args.tiny else ''}"
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    md = out_dir / f"{name}.md"
    js = out_dir / f"{name}.json"
    command = "python benchmarks/train_speed.py " + " ".join(args.argv)
    commands = [command]
    if add and js.is_file():  # with the rows (and alternations) of earlier invocations
        old = json.loads(js.read_text())
        results = merge(old["results"], [json.loads(json.dumps(r)) for r in results])
        commands = [c for c in old.get("commands", [old.get("command")]) if c != command] + [command]
    text = [
        f"# Training speed and memory, {'tiny models' if args.tiny else 'the published recipes'}: ours beside the reference script",
        "",
        *[f"`{c}`  " for c in commands],
        "",
        f"{machine['cores']} cores ({machine['cpu']}), torch {machine['torch']}, {machine['date']}. Random weights, "
        f"published-layout folders, batch 1, accumulation 1, {'fp16' if args.device.startswith('cuda') else 'fp32'}; "
        "per-step time = (the N-step run - the short run, one step per image) / (N - images), whole-process wall "
        "time; peak RSS of the "
        "whole N-step process. Median over the alternations (min-max); the ratios are the medians of the "
        "per-alternation ratios (min-max).",
        "",
        table(results),
        "",
    ]
    md.write_text("\n".join(text))
    js.write_text(json.dumps({"machine": machine, "commands": commands, "results": results}, indent=2))
    return md, js


# --- profile: one step of ours under torch.profiler -------------------------------------------------------------------


def profile_child(args) -> None:
    """One step (the second: the first allocates the optimizer state) of ours under torch.profiler; the top entries
    by self CPU time to --profile_out."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import train.loop as loop
    from train.cli import config_from_args

    prof = profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
        record_shapes=True,
    )

    class Bar:  # the loop's progress bar, replaced: it marks the step boundaries
        def __init__(self, *a, **k):
            self.n = 0

        def update(self, n):
            self.n += n
            if self.n == 1:
                prof.start()
            elif self.n == 2:
                prof.stop()

        def set_postfix(self, **k):
            pass

        def close(self):
            pass

    loop.tqdm = Bar
    loop.train(config_from_args(args.rest))
    by_op = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=args.profile_top, max_name_column_width=60
    )
    by_shape = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.profile_top, max_name_column_width=40, max_shapes_column_width=60
    )
    Path(args.profile_out).write_text(by_op + "\n" + by_shape)


def profile_rows(args, work: Path, out_dir: Path) -> None:
    for model in args.models:
        folder, images, res = prepare(model, work, args.tiny, args.images)
        for row in args.rows:
            target = (
                out_dir / f"train_profile_{'cpu' if not args.device.startswith('cuda') else 'cuda'}_{model}_{row}.txt"
            )
            argv = flags(row, folder, images, res, 2, work / "out-profile", args.device)
            env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
            cmd = [
                sys.executable,
                __file__,
                "--profile_child",
                "--profile_out",
                str(target),
                "--profile_top",
                str(args.profile_top),
                "--",
                *argv,
            ]
            subprocess.run(["rm", "-rf", str(work / "out-profile")], check=True)
            subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
            print(f"-- {target}")


# --- micro: the effect of single changes, each A/B in one process ------------------------------------------------------


def lora_step_with_attention_recompute():
    """Two LoRA steps of the amused-256 U-ViT (the recipe's adapters and fused AdamW; random weights and inputs, on
    the caching allocator as in the loop): its attentions' inputs saved, and recomputed in the backward."""
    import torch

    from convert.lora import module_namer
    from train import cpu_cache
    from train.masking import masked_cross_entropy
    from uvit import UViT, UViTConfig
    from uvit.lora import inject_lora

    cfg = UViTConfig.amused_256()
    model = UViT(cfg)
    inject_lora(model, ["to_q", "to_k", "to_v"], 16, 32, namer=module_namer(model))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=8e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.codebook_size, (1, 16, 16), generator=g)
    text, pooled = torch.randn(1, 77, cfg.encoder_hidden_size, generator=g), torch.randn(1, cfg.cond_embed_dim)
    micro_conds = torch.tensor([[256.0, 256, 0, 0, 6]])

    def step(recompute: bool):
        def run():
            model.enable_attention_recompute(recompute)
            masked = torch.rand(1, 16, 16, generator=g) < 0.5
            inputs, labels = ids.masked_fill(masked, cfg.mask_token_id), ids.masked_fill(~masked, -100)
            with cpu_cache.caching():
                logits = model(inputs, text, pooled, micro_conds).permute(0, 2, 3, 1)
                masked_cross_entropy(logits, labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return run

    return step(False), step(True)


def micro(args, out_dir: Path) -> Path:
    """Single changes measured side by side (alternating A and B, median of --micro_repeats), at the sizes of the
    amused-256 step: the memory sampler's interval (5 ms as before, 0.25 s now) beside a stretch of matmuls of the
    transformer's shapes; one LoRA layer (1024 -> 1024, rank 16, 256 tokens) forward and backward with the scaling
    on the out-wide update (as before) or on the rank-wide intermediate (now); the 8-bit AdamW update of one
    GEGLU-sized parameter (5632 x 1024), bitsandbytes' own CPU update or the fused one (train/adamw8bit.py); a whole
    LoRA step of amused-256 with its attentions' inputs saved or recomputed (change 11 in docs/training.md)."""
    import bitsandbytes.functional as bnbF
    import torch

    from train import adamw8bit
    from train.tracking import MemoryMonitor
    from uvit.lora import LoRALinear

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    x, w = torch.randn(256, 1024), torch.randn(5632, 1024)

    def matmuls():
        for _ in range(12):
            torch.nn.functional.linear(x, w)

    def with_monitor(interval):
        def run():
            m = MemoryMonitor(torch.device("cpu"), interval).start()
            matmuls()
            m.stop()

        return run

    layer = LoRALinear.from_linear(torch.nn.Linear(1024, 1024, bias=False), rank=16, alpha=32)
    torch.nn.init.normal_(layer.lora_b.weight)
    xs = torch.randn(1, 256, 1024, requires_grad=True)

    def lora(cheap: bool):
        def run():
            for _ in range(50):
                out = torch.nn.functional.linear(xs, layer.weight)
                h = layer.lora_a(xs)
                update = layer.lora_b(h * layer.scaling) if cheap else layer.lora_b(h) * layer.scaling
                (out + update).sum().backward()

        return run

    n = 5632 * 1024
    param, grad = torch.randn(n), torch.randn(n) * 1e-3
    state = [torch.randint(0, 256, (n,), dtype=torch.uint8) for _ in range(2)]
    absmax = [torch.rand(n // 256) * 1e-3, torch.rand(n // 256) * 1e-6]
    qmaps = [bnbF.create_dynamic_map(signed=True), bnbF.create_dynamic_map(signed=False)]

    def adam8(fused: bool):
        def run():
            for _ in range(10):
                if fused:
                    adamw8bit.fused_update(grad, param, *state, 0.9, 0.999, 1e-8, 10, 1e-5, *qmaps, *absmax, 1e-2)
                else:
                    torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
                        "adam", grad, param, *state, 0.9, 0.999, 0.0, 0.0, 1e-8, 10, 1e-5, qmaps[0], qmaps[1],
                        *absmax, 1e-2, 1.0, False,
                    )  # fmt: skip

        return run

    recompute_off, recompute_on = lora_step_with_attention_recompute()
    cases = {
        "memory sampler during 12 matmuls (256x1024 @ 1024x5632)": (
            with_monitor(0.005),
            with_monitor(0.25),
            "5 ms",
            "0.25 s",
        ),
        "LoRA layer forward + backward x 50 (256 tokens, 1024 -> 1024, rank 16)": (
            lora(False),
            lora(True),
            "scaled update",
            "scaled intermediate",
        ),
        "8-bit AdamW update x 10 of a 5632 x 1024 parameter": (
            adam8(False),
            adam8(True),
            "bitsandbytes' CPU update",
            "fused (train/adamw8bit.py)",
        ),
        "LoRA step of the amused-256 U-ViT (batch 1, 256 tokens; random weights and inputs)": (
            recompute_off,
            recompute_on,
            "attention inputs saved",
            "recomputed (change 11)",
        ),
    }
    if not adamw8bit.available():
        del cases["8-bit AdamW update x 10 of a 5632 x 1024 parameter"]
    lines = ["| change | before | after | before s | after s | after / before |", "|---|---|---|---|---|---|"]
    for name, (before, after, a, b) in cases.items():
        before(), after()  # warm-up
        tb, ta = [], []
        for _ in range(args.micro_repeats):
            tb.append(timed(before))
            ta.append(timed(after))
        mb, ma = statistics.median(tb), statistics.median(ta)
        lines.append(
            f"| {name} | {a} | {b} | {_median_spread(tb, '.3f')} | {_median_spread(ta, '.3f')} | {ma / mb:.3f} |"
        )
        print(lines[-1], flush=True)
    target = out_dir / f"train_speed_micro_{'cuda' if args.device.startswith('cuda') else 'cpu'}.md"
    target.write_text(
        "\n".join(
            [
                "# Single changes of the training step, each measured side by side in one process",
                "",
                f"`python benchmarks/train_speed.py --micro --micro_repeats {args.micro_repeats}` "
                f"({os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}); median (min-max) over "
                f"{args.micro_repeats} alternations.",
                "",
                *lines,
                "",
            ]
        )
    )
    return target


# --- main ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", default=None, help="path of the reference training script (train_amused.py)")
    p.add_argument(
        "--baseline",
        default=None,
        help="another checkout of this repository (e.g. before a change): its "
        "`python -m train` runs as a third implementation, 'baseline', in the same alternation",
    )
    p.add_argument("--models", nargs="+", default=["256", "512"], choices=["256", "512"])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--steps", type=int, default=None, help="N of the long runs (default 5; 3 with --tiny)")
    p.add_argument(
        "--images",
        type=int,
        default=1,
        help="square images in the data (the short runs take one step per image, so that they read them all)",
    )
    p.add_argument(
        "--alternations",
        type=int,
        default=None,
        help="(N-step, short) pairs per implementation (default 2; 1 with --tiny)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models in a temporary folder: a smoke test of this script")
    p.add_argument(
        "--work_dir", default=None, help="default: a temporary folder with --tiny, else <tmp>/muse-train-speed"
    )
    p.add_argument("--out", default=str(HERE / "results"), help="where the markdown and JSON go")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument(
        "--merge",
        action="store_true",
        help="add to an earlier results file: its other rows are kept, a row "
        "measured again (same N) gets these alternations added to its earlier ones",
    )
    p.add_argument("--profile", action="store_true", help="profile one step of ours per row instead (torch.profiler)")
    p.add_argument("--profile_top", type=int, default=25)
    p.add_argument("--micro", action="store_true", help="measure single changes A/B in one process instead")
    p.add_argument("--micro_repeats", type=int, default=7)
    # the children's own options
    p.add_argument("--run_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peak_file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(own)
    args.rest, args.argv = rest, argv
    if args.run_child:
        run_child(args)
        return None
    sys.path.insert(0, str(REPO))
    if args.profile_child:
        profile_child(args)
        return None
    if args.micro:
        print(f"written: {micro(args, Path(args.out))}")
        return None
    args.steps = args.steps or (3 if args.tiny else 5)
    args.alternations = args.alternations or (1 if args.tiny else 2)
    if not 1 <= args.images <= len(PROMPTS):
        p.error(f"--images must be between 1 and {len(PROMPTS)}")
    if args.steps <= args.images:
        p.error(f"--steps must exceed --images (the short run takes {args.images} step(s))")
    impls = {"ours": ("ours", REPO)}
    if args.baseline:
        impls["baseline"] = ("ours", Path(args.baseline).resolve())
    if args.reference:
        impls["reference"] = (str(Path(args.reference).resolve()), REPO)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or (tmp if args.tiny else Path(tempfile.gettempdir()) / "muse-train-speed"))
        work.mkdir(parents=True, exist_ok=True)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)  # before any run: a profile or a row is not lost at the end
        if args.profile:
            profile_rows(args, work, out_dir)
            return None
        results = []
        for model in args.models:
            for row in args.rows:
                print(f"-- amused-{model} {row}", flush=True)
                row_impls = impls if ROWS[row][1] else {k: v for k, v in impls.items() if k != "reference"}
                results.append(measure_row(model, row, row_impls, args, work))
                # written after every row (a long run stopped midway keeps its rows): the first row replaces the
                # files (unless --merge), each later one is added
                md, js = write_results(results[-1:], args, out_dir, add=args.merge or len(results) > 1)
    print()
    print(md.read_text())
    print(f"written: {md}, {js}")
    return results


if __name__ == "__main__":
    main()
