"""The training loop: fine-tune the U-ViT of a loaded aMUSEd pipeline on image-caption data. Read it top to bottom.

One optimizer step:
    for each of `gradient_accumulation_steps` micro-batches:
        images -> VQ token ids (or read from the pre-encoded cache); prompts -> text conditioning
        draw masks and conditioning dropout for the global batch, take this process's rows
        logits = U-ViT(masked ids, text, pooled text, micro-conditions)        (autocast, DDP no_sync but on the last)
        loss = cross-entropy on the masked tokens / accumulation steps; backward (through the fp16 grad scaler)
    clip, step, schedule, EMA; log, validate, checkpoint at their intervals.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from convert import Components, load_components, uvit_to_diffusers
from convert.lora import (
    CLIP_ALIASES,
    MUSE_WEIGHT_NAME,
    PEFT_WEIGHT_NAME,
    inject_lora,
    parse_adapters,
    read_lora_file,
    save_lora,
)
from convert.ours import WEIGHTS as OUR_TRANSFORMER_WEIGHTS
from convert.safe_load import read_safetensors, safetensors_header
from muse import Pipeline, files
from muse.arguments import check_device
from muse.text import encode_text
from uvit.lora import lora_layers, set_adapters

from . import checkpoint, cpu_cache, distributed
from .config import TrainConfig
from .data import (
    GlobalBatchSampler,
    ImageDataset,
    PreEncodedDataset,
    build_source,
    check_readable,
    collate,
    fingerprint,
    has_one_crop,
    pre_encode,
    pre_encoded_matches,
)
from .ema import EMA
from .masking import MaskingConfig, apply_masks, draw_masks, masked_cross_entropy
from .optim import StepInBackward, build_optimizer, build_scheduler, decay_groups, uvit_rename
from .resume import check as resume_check
from .resume import settings_of
from .tracking import MemoryMonitor, Tracker, memory_stats, setup_logging

DIFFUSERS_TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"

log = logging.getLogger("train")

# optimizer settings that are this run's own on resume (the saved state would otherwise replace them)
OPTIMIZER_HYPERPARAMETERS = ("betas", "eps", "weight_decay")
# trained parameters from which on the optimizer steps inside the backward pass (where it can: see `steps_in_backward`):
# the full gradients are then never held at once. Below it (LoRA) they are small and one step for all is cheaper.
STEP_IN_BACKWARD_MIN_PARAMETERS = 2**24
ENCODERS = ("vqvae", "text_encoder")  # what pre-encoding needs, loaded (and freed) before the U-ViT


@dataclass
class TrainResult:
    step: int  # optimizer steps done
    losses: list[float] = field(default_factory=list)  # per optimizer step of this run, mean over processes
    skipped_images: int = 0  # unreadable images met (each time one was replaced)
    skipped_names: set[str] = field(default_factory=set)
    output_dir: Path | None = None
    memory: dict[str, float] = field(default_factory=dict)  # peaks, see tracking.MemoryMonitor


def train(cfg: TrainConfig, components=None) -> TrainResult:
    """Run the training `cfg` describes. `components` (a convert.Components) skips loading the pretrained model:
    tests and notebooks pass models built in memory; it is trained in place."""
    preflight(cfg)  # the mistakes that need neither data nor model: before anything slow
    source = build_source(cfg)
    check_readable(source)
    out = Path(cfg.output_dir)
    prepare_output_dir(out)
    dist = distributed.setup(cfg.device)
    device = dist.device
    setup_logging(dist.main, out / cfg.logging_dir / "train.log")
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_cache, why = choose_pre_encode(cfg, source, dist.world)
    log.info("%s: %s", "pre-encoding the data" if use_cache else "encoding in every step", why)
    resume = checkpoint.resolve(out, cfg.resume_from_checkpoint)  # a checkpoint folder, or None (a fresh start)
    # One seed for the run. The masks, conditioning dropout and data order are drawn for the global batch from
    # streams every process shares; torch's global RNG (LoRA dropout) differs per process, as data parallel wants.
    seed = cfg.seed if cfg.seed is not None else checkpoint.saved_seed(resume)  # a resumed run keeps its seed
    seed = dist.broadcast(seed if seed is not None else random.SystemRandom().randrange(2**31))
    torch.manual_seed(seed + dist.rank)
    gen = torch.Generator().manual_seed(seed)

    # --- models: the frozen encoders first, then the U-ViT --------------------------------------------------------------
    # With pre-encoding the encoders serve only to fill the cache: loaded here, they are freed (unless validation
    # needs them) before the U-ViT is loaded, so the three networks are never in memory at once. A cache already
    # written from the same model, data and seed (a resumed run, a shared --pre_encoded_dir) leaves nothing for the
    # encoders to do: a model loaded here then loads without them.
    loaded_here = components is None
    cached = False
    if use_cache:
        cache = Path(cfg.pre_encoded_dir or out / "pre_encoded")
        model_source = str(cfg.pretrained_model_name_or_path) if loaded_here else components.source
        fp = fingerprint([source.describe(), cfg.resolution, model_source, seed, cfg.mixed_precision])
        cached = pre_encoded_matches(cache, fp)
    if loaded_here and cached and not cfg.validation_prompts:
        log.info("pre-encoded data found in %s: the encoders are not loaded", cache)
        components = Components(None, None, None, None, source=model_source)
        vqvae = text_encoder = tokenizer = None
    else:
        if loaded_here:
            components = load_networks(cfg, ENCODERS if use_cache else Components.MODULES)
        text_encoder = prepare_text_encoder(cfg, components.text_encoder, device)
        tokenizer = components.tokenizer
        vqvae = components.vqvae.requires_grad_(False).eval().to(device)  # the VQ-GAN stays fp32, as the reference

    def encode_prompts(prompts: list[str]):
        """prompts -> (encoder_hidden_states (B, 77, D), prompt_embeds (B, Dc)), with grad when the encoder trains."""
        # encode_text runs under no_grad (inference); a trained encoder needs its undecorated body
        fn = getattr(encode_text, "__wrapped__", encode_text) if cfg.train_text_encoder else encode_text
        cond = fn(tokenizer, text_encoder, prompts)
        return cond.encoder_hidden_states, cond.prompt_embeds

    # --- data --------------------------------------------------------------------------------------------------------
    dataset = ImageDataset(source, cfg.resolution, seed)
    log.info("data: %s", source.describe())
    if use_cache:
        if dist.main and not cached:  # each network in its own dtype; the VQ-GAN in fp32
            pre_encode(dataset, cache, vqvae, encode_prompts, fp, cfg.train_batch_size, store_dtype=cfg.weight_dtype)
        dist.barrier()
        dataset = PreEncodedDataset(cache)
        empty = (dataset.empty_hidden, dataset.empty_pooled)
        if cfg.validation_prompts:  # kept for validation, off the training device
            vqvae, text_encoder = vqvae.to("cpu"), text_encoder.to("cpu")
        else:  # nothing needs them any more: free them (and a tokenizer loaded here: tens of MB of Python objects)
            vqvae = text_encoder = components.vqvae = components.text_encoder = tokenizer = None
            if loaded_here:
                components.tokenizer = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cpu_cache.return_free_heap()  # the encoders' freed heap, which the U-ViT's loading would not fill
        if loaded_here:
            uvit_only = load_networks(cfg, ("transformer",))  # its tokenizer is dropped with it
            components.transformer, components.scheduler_config = uvit_only.transformer, uvit_only.scheduler_config
            del uvit_only
    else:
        # training encodes only: the VQ decoder (60% of the VQ-GAN) waits on the CPU until validation needs it, and
        # without validation, in a model loaded here, it is dropped
        if loaded_here and not cfg.validation_prompts:
            vqvae.decoder = vqvae.post_quant_conv = None
        else:
            vqvae.decoder.to("cpu")
            vqvae.post_quant_conv.to("cpu")
        empty = None if cfg.train_text_encoder else encode_prompts([""])  # the empty prompt, for conditioning dropout
    if resume is not None:  # before any state is loaded: refuse settings that shape the saved state differently
        resume_check(resume, checkpoint.read_state(resume), cfg, components.transformer.config.to_dict())
    mask_id = int((components.scheduler_config or {}).get("mask_token_id", components.transformer.mask_token_id))
    transformer = prepare_transformer(cfg, components.transformer, device)
    trained = {"transformer": [p for p in transformer.parameters() if p.requires_grad]}
    if cfg.train_text_encoder:
        trained["text_encoder"] = [p for p in text_encoder.parameters() if p.requires_grad]
    B, G = cfg.train_batch_size, cfg.train_batch_size * dist.world
    masking = MaskingConfig(cfg.min_masking_rate, cfg.rect_mask_prob, cfg.label_smoothing, cfg.masking_schedule)

    # --- optimizer, schedule, grad scaler, EMA -------------------------------------------------------------------------
    groups = decay_groups(transformer.named_parameters(), cfg.adam_weight_decay, uvit_rename)
    if cfg.train_text_encoder:  # the reference decays every text-encoder parameter
        groups.append({"params": trained["text_encoder"], "weight_decay": cfg.adam_weight_decay})
    lr = cfg.learning_rate * (B * dist.world * cfg.gradient_accumulation_steps if cfg.scale_lr else 1)
    optimizer = build_optimizer(
        groups, lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_weight_decay, cfg.adam_epsilon, cfg.use_8bit_adam
    )
    scheduler = build_scheduler(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    in_backward = steps_in_backward(cfg, dist, sum(p.numel() for ps in trained.values() for p in ps))
    stepper = StepInBackward(optimizer, [p for ps in trained.values() for p in ps]) if in_backward else None
    ema = None
    if cfg.use_ema:
        ema = EMA(
            trained_named(transformer, text_encoder, cfg), cfg.ema_decay, cfg.ema_update_after_step, cfg.ema_warmup
        )

    # --- resume ------------------------------------------------------------------------------------------------------
    step, position = 0, 0  # optimizer steps done; global batches consumed
    if cfg.resume_from_checkpoint and resume is None:
        log.info("no checkpoint in %s yet: starting a new run", out)
    if resume is not None:
        step, position = load_checkpoint(
            resume, cfg, dist, transformer, text_encoder, optimizer, scheduler, scaler, ema, gen
        )
        log.info("resumed from %s at step %d", resume, step)
        if step >= cfg.max_train_steps:
            log.warning(
                "the checkpoint is at step %d >= --max_train_steps %d: nothing to train (raise --max_train_steps)",
                step,
                cfg.max_train_steps,
            )

    sampler = GlobalBatchSampler(len(dataset), B, seed, dist.rank, dist.world, start=position)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.dataloader_num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker seeds; leaves torch's global RNG untouched
    )
    batches = iter(loader)
    model = DDP(transformer, device_ids=[device] if device.type == "cuda" else None) if dist.enabled else transformer
    if cfg.compile:
        model = compiled(model, device)
    autocast = torch.autocast(device.type, dtype=cfg.weight_dtype, enabled=cfg.mixed_precision != "no")
    tracker = Tracker(cfg.report_to, dist.main, cfg.to_dict(), out / cfg.logging_dir)
    result = TrainResult(step=step, output_dir=out)
    log.info(
        "training %s: %d trainable parameters, global batch %d x %d accumulation, %d steps, lr %.3g, %s, device %s x %d",
        "LoRA adapters" if cfg.use_lora else "the full U-ViT",
        sum(p.numel() for ps in trained.values() for p in ps),
        G,
        cfg.gradient_accumulation_steps,
        cfg.max_train_steps,
        lr,
        cfg.mixed_precision,
        device,
        dist.world,
    )

    # --- the loop ----------------------------------------------------------------------------------------------------
    # on a CPU the step's tensors come from the caching allocator (train/cpu_cache.py), the loaded weights do not
    with cpu_cache.caching(cfg.cpu_caching_allocator and device.type == "cpu") as caching:
        if caching:
            log.info("CPU tensors of the loop from the caching allocator (--no_cpu_caching_allocator: torch's own)")
        monitor = MemoryMonitor(device).start()
        bar = tqdm(total=cfg.max_train_steps, initial=step, disable=not dist.main, desc="train")
        window_loss, window_ratio, window_start = [], [], time.perf_counter()
        pending = []  # this window's step losses, still on the device: read (one host sync) at logging steps and the end
        while step < cfg.max_train_steps:
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                position += 1
                result.skipped_images += len(batch["skipped"])
                result.skipped_names.update(batch["skipped"])

                with torch.no_grad():
                    tokens = batch_tokens(batch, vqvae, cfg.split_vae_encode, device)  # (B, h, w)
                masks = draw_masks(G, *tokens.shape[1:], masking, gen)  # for the global batch; our rows below
                dropped = torch.rand(G, generator=gen) < cfg.cond_dropout_prob
                rows = slice(dist.rank * B, (dist.rank + 1) * B)
                input_ids, labels = apply_masks(tokens, masks.mask[rows], mask_id)
                hidden, pooled = batch_conditioning(batch, encode_prompts, empty, dropped[rows].to(device), device)
                micro_conds = batch["micro_conds"].to(device)
                # the loss is the mean over the GLOBAL batch's masked tokens (or, per sample, over its samples' means):
                # DDP averages gradients over processes
                normalizer = (G if cfg.loss_per_sample else float(masks.mask.sum())) / dist.world

                last = micro == cfg.gradient_accumulation_steps - 1
                with model.no_sync() if dist.enabled and not last else contextlib.nullcontext(), autocast:
                    logits = model(input_ids, hidden, pooled, micro_conds).permute(0, 2, 3, 1)  # (B, h, w, K) view
                    loss = masked_cross_entropy(logits, labels, cfg.label_smoothing, normalizer, cfg.loss_per_sample)
                    loss = loss / cfg.gradient_accumulation_steps
                scaler.scale(loss).backward()
                step_loss += loss.detach()
                window_ratio.append(masks.ratio.mean())  # a CPU tensor (the masks are drawn there)

            if stepper is None:  # else every parameter has stepped in the backward already
                if cfg.train_text_encoder:
                    dist.average_gradients(trained["text_encoder"])
                if cfg.max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_([p for ps in trained.values() for p in ps], cfg.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)  # frees the gradients until the next backward
            scheduler.step()
            step += 1
            if ema is not None:
                ema.update()

            pending.append(step_loss)
            monitor.sample()
            bar.update(1)

            if step % cfg.logging_steps == 0 or step == cfg.max_train_steps:
                # the window's losses, averaged over processes, in one read (every process logs at the same steps)
                window_loss = [float(v) for v in dist.mean(torch.stack(pending)).tolist()]
                pending = []
                result.losses += window_loss
                bar.set_postfix(loss=f"{window_loss[-1]:.4f}")
                elapsed = time.perf_counter() - window_start
                samples = len(window_loss) * G * cfg.gradient_accumulation_steps
                metrics = {
                    "loss": sum(window_loss) / len(window_loss),
                    "lr": scheduler.get_last_lr()[0],
                    "masking_rate": float(torch.stack(window_ratio).double().mean()),
                    "samples_per_s": samples / max(elapsed, 1e-9),
                    "skipped_images": result.skipped_images,
                    **memory_stats(device),
                }
                tracker.log(metrics, step)
                window_loss, window_ratio, window_start = [], [], time.perf_counter()
            if cfg.validation_prompts and step % cfg.validation_steps == 0 and dist.main:
                validate(cfg, components, transformer, vqvae, text_encoder, tokenizer, ema, step, out, tracker, seed)
            if step % cfg.checkpointing_steps == 0:
                save_checkpoint(
                    out,
                    step,
                    position,
                    seed,
                    cfg,
                    dist,
                    transformer,
                    text_encoder,
                    optimizer,
                    scheduler,
                    scaler,
                    ema,
                    gen,
                )
        bar.close()
        if stepper is not None:
            stepper.remove()
        result.memory = monitor.stop()
        if caching:  # what the caching allocator held at the end: blocks in use and idle, and the loop's peak in use
            held = cpu_cache.stats()
            result.memory |= {"cpu_cache_reserved_mb": round(held.reserved / 2**20, 1)}
        log.info("memory: %s", " ".join(f"{k}={v}" for k, v in result.memory.items()))

    # --- the end: a last checkpoint, then the trained weights (EMA if on) ---------------------------------------------
    if cfg.save_at_end and not (out / f"checkpoint-{step}" / checkpoint.DONE_FILE).is_file():
        save_checkpoint(
            out, step, position, seed, cfg, dist, transformer, text_encoder, optimizer, scheduler, scaler, ema, gen
        )
    if dist.main and cfg.save_at_end:
        if ema is not None:
            ema.copy_to_params()
        save_final(out, cfg, transformer, text_encoder)
    if dist.main and result.skipped_images:
        names = sorted(result.skipped_names)
        log.warning(
            "%d unreadable image(s) were skipped (%d distinct): %s", result.skipped_images, len(names), names[:5]
        )
    dist.barrier()
    tracker.finish()
    result.step = step
    return result


# --- models --------------------------------------------------------------------------------------------------------------


def choose_pre_encode(cfg: TrainConfig, source, world: int) -> tuple[bool, str]:
    """Whether to pre-encode, and why. `--pre_encode` / `--no_pre_encode` decide; by default (None) it is on when it
    changes nothing the step computes and saves work: the text encoder is frozen, every image has a single crop at
    the resolution (so each read gives the same VQ tokens; a random crop needs the VQ-GAN in the step), and the run
    reads every example at least once (otherwise encoding them all first costs more than it saves)."""
    if cfg.pre_encode is not None:
        return cfg.pre_encode, "--pre_encode" if cfg.pre_encode else "--no_pre_encode"
    if cfg.train_text_encoder:
        return False, "the text encoder trains"
    reads = cfg.max_train_steps * cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    if reads < len(source):
        return False, f"the run reads {reads} examples of {len(source)}: encoding all of them first would cost more"
    for i in range(len(source)):
        try:
            width, height = source.size(i)
        except Exception as e:  # unreadable: the step replaces it by the next image, which a cache cannot mirror
            return False, f"{source.name(i)} cannot be read ({type(e).__name__}: {e})"
        if not has_one_crop(width, height, cfg.resolution):
            return False, f"{source.name(i)} ({width}x{height}) has more than one crop at {cfg.resolution}"
    return True, (
        f"automatic (every image has a single crop at {cfg.resolution}, the run reads {reads} examples of "
        f"{len(source)}; --no_pre_encode turns it off)"
    )


def load_networks(cfg: TrainConfig, networks: tuple[str, ...]):
    """The named networks of the pretrained model (convert.Components, the others None)."""
    log.info("loading %s from %s", ", ".join(networks), cfg.pretrained_model_name_or_path)
    return load_components(
        cfg.pretrained_model_name_or_path, variant=cfg.variant, revision=cfg.revision, networks=networks
    )


def prepare_transformer(cfg: TrainConfig, transformer, device):
    """Full fine-tuning: fp32 trainable weights (autocast does the mixed precision). LoRA: the frozen base in the
    mixed-precision dtype (half the memory), fp32 adapters on the target modules."""
    if cfg.use_lora:
        transformer.requires_grad_(False).to(device, cfg.weight_dtype)
        names = inject_lora(transformer, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        log.info("LoRA rank %d alpha %g on %d modules", cfg.lora_r, cfg.lora_alpha, len(names))
    else:
        transformer.requires_grad_(True).to(device, torch.float32)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    elif recompute_attention(cfg):
        transformer.enable_attention_recompute()
        log.info("attention inputs recomputed in the backward (--no_recompute_attention: saved)")
    return transformer.train()


def recompute_attention(cfg: TrainConfig) -> bool:
    """Whether the U-ViT's attentions recompute q, k and v in the backward (uvit.model.attend_normed): as set, else
    with LoRA, whose step computes no weight gradients, so that what it saves is mostly activations."""
    return cfg.use_lora if cfg.recompute_attention is None else cfg.recompute_attention


def prepare_text_encoder(cfg: TrainConfig, text_encoder, device):
    """Frozen (the default): eval mode, mixed-precision dtype. Trained: full (fp32) or LoRA on its q/k/v projections
    (the reference's to_q/to_k/to_v targets are translated: CLIP names them q_proj/k_proj/v_proj)."""
    if not cfg.train_text_encoder:
        return text_encoder.requires_grad_(False).eval().to(device, cfg.weight_dtype)
    if cfg.text_encoder_use_lora:
        text_encoder.requires_grad_(False).to(device, cfg.weight_dtype)
        inject_lora(
            text_encoder,
            cfg.text_encoder_lora_target_modules,
            cfg.text_encoder_lora_r,
            cfg.text_encoder_lora_alpha,
            aliases=CLIP_ALIASES,
        )
    else:
        text_encoder.requires_grad_(True).to(device, torch.float32)
    if cfg.gradient_checkpointing:
        text_encoder.gradient_checkpointing_enable()
    return text_encoder.train()


def steps_in_backward(cfg: TrainConfig, dist, trained_parameters: int) -> bool:
    """Whether the optimizer steps inside the backward pass (train.optim.StepInBackward): when one backward makes
    the step's whole gradient and nothing reads all of it first (no accumulation, clipping, fp16 grad scaler or data
    parallel averaging), and the gradients are large enough to matter."""
    return (
        cfg.gradient_accumulation_steps == 1
        and cfg.max_grad_norm is None
        and cfg.mixed_precision != "fp16"
        and not dist.enabled
        and trained_parameters >= STEP_IN_BACKWARD_MIN_PARAMETERS
    )


def compiled(model, device):
    """torch.compile(model), after checking that its backend can build kernels for `device` here."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise RuntimeError("--compile on a CPU needs a C++ compiler (g++, c++ or clang++ on PATH); none was found")
    log.info("compiling the U-ViT's step (torch.compile): the first steps are slow")
    return torch.compile(model, dynamic=False)  # static shapes: a new shape compiles anew, never symbolically


def trained_named(transformer, text_encoder, cfg: TrainConfig) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(f"transformer.{n}", p) for n, p in transformer.named_parameters() if p.requires_grad]
    if cfg.train_text_encoder:
        named += [(f"text_encoder.{n}", p) for n, p in text_encoder.named_parameters() if p.requires_grad]
    return named


# --- one batch ---------------------------------------------------------------------------------------------------------


def batch_tokens(batch: dict, vqvae, split: int | None, device) -> torch.Tensor:
    """VQ token ids (B, h, w) of the batch: read from the pre-encoded cache, or encoded here (in chunks of `split`)."""
    if "ids" in batch:
        return batch["ids"].to(device)
    pixels = batch["pixels"].to(device, non_blocking=True)
    chunk = split or pixels.shape[0]
    return torch.cat([vqvae.encode(pixels[i : i + chunk]) for i in range(0, pixels.shape[0], chunk)])


def batch_conditioning(batch: dict, encode_prompts, empty, dropped: torch.Tensor, device):
    """(encoder_hidden_states (B, L, D), prompt_embeds (B, Dc)) of the batch, where the rows in `dropped` are
    replaced by the empty prompt's conditioning (classifier-free guidance training)."""
    if "encoder_hidden_states" in batch:
        hidden, pooled = batch["encoder_hidden_states"].to(device), batch["prompt_embeds"].to(device)
    elif empty is None:  # the text encoder trains: encode the empty prompt with the batch, through the same weights
        hidden, pooled = encode_prompts(list(batch["prompt"]) + [""])
        empty, hidden, pooled = (hidden[-1:], pooled[-1:]), hidden[:-1], pooled[:-1]
    else:
        hidden, pooled = encode_prompts(list(batch["prompt"]))
    if dropped.any():
        empty_hidden, empty_pooled = (e.to(device, h.dtype) for e, h in zip(empty, (hidden, pooled)))
        hidden = torch.where(dropped[:, None, None], empty_hidden.reshape(1, *hidden.shape[1:]), hidden)
        pooled = torch.where(dropped[:, None], empty_pooled.reshape(1, -1), pooled)
    return hidden, pooled


# --- validation ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(cfg, components, transformer, vqvae, text_encoder, tokenizer, ema, step, out, tracker, seed) -> None:
    """Images for the validation prompts (EMA weights when on), saved under <output_dir>/validation/step-<n>/."""
    device = transformer.device
    parts = [vqvae.encoder, vqvae.quant_conv, vqvae.quantizer, vqvae.post_quant_conv, vqvae.decoder, text_encoder]
    placement = [(m, next(m.parameters()).device) for m in parts]  # put back afterwards (some wait on the CPU)
    was_training = (transformer.training, text_encoder.training)
    vqvae.to(device)
    text_encoder.to(device).eval()
    transformer.eval()
    try:
        with ema.swapped_in() if ema is not None else contextlib.nullcontext():
            mask_id = (components.scheduler_config or {}).get("mask_token_id")
            pipe = Pipeline(transformer, vqvae, text_encoder, tokenizer, mask_token_id=mask_id)
            images = pipe(
                list(cfg.validation_prompts),
                generator=torch.Generator().manual_seed(seed),
                num_inference_steps=cfg.validation_inference_steps,
                progress_bar=False,
            )
    finally:
        transformer.train(was_training[0])
        text_encoder.train(was_training[1])
        for module, where in placement:
            module.to(where)
    folder = out / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):  # whole files or none, as every output of a run
        files.save_png_atomic(image, folder / f"{i:02d}.png")
    files.write_text_atomic(folder / "prompts.json", json.dumps(list(cfg.validation_prompts), indent=2))
    tracker.log_images(images, cfg.validation_prompts, step)
    log.info("validation images: %s", folder)


# --- checkpoints --------------------------------------------------------------------------------------------------------


def save_checkpoint(
    out, step, position, seed, cfg, dist, transformer, text_encoder, optimizer, scheduler, scaler, ema, gen
) -> None:
    """Everything needed to continue exactly; see train.checkpoint for the layout and the atomic write."""
    tmp = Path(dist.broadcast(str(checkpoint.begin(out, step)) if dist.main else None))
    checkpoint.save_torch(checkpoint.rng_state(), tmp / f"rng-rank{dist.rank}.pt")
    dist.barrier()
    if dist.main:
        with _full_disk_reported(tmp):
            _write_checkpoint_files(tmp, cfg, transformer, text_encoder, optimizer, scheduler, scaler, ema, gen)
        info = {
            "step": step,
            "position": position,
            "seed": seed,
            "world": dist.world,
            "use_lora": cfg.use_lora,
            **settings_of(cfg, base_config(transformer)),
        }
        final = checkpoint.commit(tmp, step, info, cfg.checkpoints_total_limit)
        log.info("saved %s", final)
    dist.barrier()


@contextlib.contextmanager
def _full_disk_reported(folder: Path):
    """A full disk while a checkpoint is written is reported as such (the safetensors writer says "os error 28")."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        if files.is_full_disk(e):
            raise files.write_error(e, folder) from e
        raise


def _write_checkpoint_files(tmp, cfg, transformer, text_encoder, optimizer, scheduler, scaler, ema, gen) -> None:
    """The main process's files of a checkpoint (see train.checkpoint for the layout), into the temporary `tmp`."""
    save_trained(transformer, tmp / "model.safetensors", cfg.use_lora, "transformer")
    if cfg.train_text_encoder:
        save_trained(text_encoder, tmp / "text_encoder.safetensors", cfg.text_encoder_use_lora, "text_encoder")
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    checkpoint.save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "generator": gen.get_state(),
        "ema_updates": ema.num_updates if ema is not None else 0,
    }
    checkpoint.save_torch(state, tmp / "trainer_state.pt")


def save_trained(module, path: Path, lora: bool, prefix: str) -> None:
    if lora:
        save_lora(module, path, fmt="muse", prefix=prefix)
    else:
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))


def load_checkpoint(
    path, cfg, dist, transformer, text_encoder, optimizer, scheduler, scaler, ema, gen
) -> tuple[int, int]:
    """Load every saved state into this run's objects (its settings were checked by `resume_check` before)."""
    info = checkpoint.read_state(path)
    load_trained(transformer, path / "model.safetensors", cfg.use_lora, "transformer")
    if cfg.train_text_encoder:
        load_trained(text_encoder, path / "text_encoder.safetensors", cfg.text_encoder_use_lora, "text_encoder")
    hyper = [{k: g[k] for k in OPTIMIZER_HYPERPARAMETERS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(checkpoint.load_torch(path / "optimizer.pt"))
    for group, values in zip(optimizer.param_groups, hyper):  # this run's betas, eps, decay, not the saved ones
        group.update(values)
    state = checkpoint.load_torch(path / "trainer_state.pt")
    base_lrs = list(scheduler.base_lrs)  # this run's learning rate
    scheduler.load_state_dict(state["scheduler"])
    # the schedule of THIS run's flags at the resumed step (the same as saved when the flags are the same; it follows
    # a changed --learning_rate or --max_train_steps instead of the old run's last value)
    scheduler.base_lrs = base_lrs
    for group, base, factor in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    scaler.load_state_dict(state["scaler"])
    gen.set_state(state["generator"])
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise ValueError(f"{path} has no EMA state but --use_ema is on")
        ema.load_state_dict(read_safetensors(path / "ema.safetensors"), state["ema_updates"])
    rng = path / f"rng-rank{dist.rank}.pt"
    if rng.is_file():
        checkpoint.set_rng_state(checkpoint.load_torch(rng))
    else:
        log.warning("%s has no RNG state for rank %d (saved with %d processes)", path, dist.rank, info.get("world", 1))
    return int(info["step"]), int(info["position"])


def load_trained(module, path: Path, lora: bool, prefix: str) -> None:
    if lora:
        load_adapters_in_place(module, path, prefix)
    else:
        state = read_safetensors(path)
        with torch.no_grad():
            missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_adapters_in_place(module, path: Path, prefix: str) -> None:
    """Copy a checkpoint's LoRA adapters into the module's existing ones, whose parameters the optimizer holds. The
    file must hold exactly those adapters, of the same ranks and alphas: anything else would swap in new modules
    the optimizer never steps."""
    safetensors_header(path)  # a missing, truncated or corrupt file names itself
    tensors, metadata = read_lora_file(path)
    try:
        adapters = parse_adapters(tensors, metadata, module, prefix)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    layers = lora_layers(module)
    problems = [f"{n}: not in the file" for n in sorted(set(layers) - set(adapters))]
    problems += [f"{n}: not an adapted module of this run" for n in sorted(set(adapters) - set(layers))]
    problems += [
        f"{n}: rank {ad.rank} alpha {ad.alpha:g} saved, rank {layers[n].rank} alpha {layers[n].alpha:g} now"
        for n, ad in adapters.items()
        if n in layers and (ad.rank != layers[n].rank or ad.alpha != layers[n].alpha)
    ]
    if problems:
        more = f" ... ({len(problems)} in all)" if len(problems) > 5 else ""
        raise ValueError(f"{path} does not fit this run's LoRA adapters: " + "; ".join(problems[:5]) + more)
    set_adapters(module, adapters)


def base_config(transformer) -> dict:
    """The U-ViT's config as a checkpoint records it (the same with or without adapters)."""
    return transformer.config.to_dict()


def transformer_files(transformer) -> tuple[dict, dict, str]:
    """(config, tensors, weights file name) of the trained U-ViT's folder: the diffusers layout
    (diffusion_pytorch_model.safetensors), or ours (model.safetensors, our names) for a U-ViT with one of our
    additions (a position embedding, full-resolution blocks), which diffusers' UVit2DModel does not have."""
    extras = transformer.config.ours_only()
    if not extras:
        config, state = uvit_to_diffusers(transformer)
        return config, state, DIFFUSERS_TRANSFORMER_WEIGHTS
    log.warning("the U-ViT has %s, which diffusers' UVit2DModel lacks: transformer/ is in our layout", extras)
    return {"_class": "uvit.UViT", **transformer.config.to_dict()}, transformer.state_dict(), OUR_TRANSFORMER_WEIGHTS


def save_final(out: Path, cfg: TrainConfig, transformer, text_encoder) -> None:
    """LoRA: the adapters in the diffusers/peft layout (pytorch_lora_weights.safetensors, loadable by diffusers and by
    convert.lora.load_lora_into) and in ours (lora.safetensors). Full: the U-ViT as a diffusers `transformer/` folder.
    Each file (and each folder) is written beside its place and renamed into it when complete: a failure leaves the
    previous one, never a half-written one."""
    out.mkdir(parents=True, exist_ok=True)
    te_lora = cfg.train_text_encoder and cfg.text_encoder_use_lora
    if cfg.use_lora:
        extra = {"text_encoder": text_encoder} if te_lora else None
        for fmt, name in (("peft", PEFT_WEIGHT_NAME), ("muse", MUSE_WEIGHT_NAME)):
            with files.atomic_path(out / name) as tmp:
                save_lora(transformer, tmp, fmt=fmt, extra=extra)
            log.info("LoRA adapters: %s", out / name)
    else:
        config, state, weights = transformer_files(transformer)
        with files.atomic_folder(out / "transformer") as folder:
            (folder / "config.json").write_text(json.dumps(config, indent=2))
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / weights))
        log.info("trained U-ViT: %s (%s)", out / "transformer", weights)
    if cfg.train_text_encoder and not te_lora:
        with files.atomic_folder(out / "text_encoder") as folder:
            text_encoder.save_pretrained(folder)
    elif te_lora and not cfg.use_lora:
        with files.atomic_folder(out / "text_encoder_lora") as folder:
            save_lora(text_encoder, folder, fmt="peft", prefix="text_encoder")
    files.write_text_atomic(out / "training_config.json", json.dumps(cfg.to_dict(), indent=2))


# --- checks before the run ---------------------------------------------------------------------------------------------


def preflight(cfg: TrainConfig) -> None:
    """The mistakes found without loading anything, each a ValueError that names it: no step count, a device that is
    not there, an output folder that is the base model's."""
    if cfg.max_train_steps is None:
        raise ValueError("--max_train_steps is required (the number of optimizer steps to train)")
    check_device(cfg.device)
    check_output_is_not_the_base_model(cfg.output_dir, cfg.pretrained_model_name_or_path)


def check_output_is_not_the_base_model(output_dir: str, base: str | None) -> None:
    """Training writes transformer/, text_encoder/ and checkpoints into --output_dir: never into the base model's
    own folder, whose weights it would overwrite."""
    if not base or not Path(base).is_dir():
        return
    out, model = Path(output_dir).resolve(), Path(base).resolve()
    if out == model or model in out.parents:
        where = "is" if out == model else "is inside"
        raise ValueError(
            f"--output_dir {output_dir} {where} the base model's folder {base}; training would write over or into "
            "the base weights. Choose another --output_dir"
        )


def prepare_output_dir(out: Path) -> None:
    """--output_dir: a folder (created if missing) this process can write, checked before anything slow."""
    try:
        files.check_writable(out, folder=True)
    except ValueError as e:
        raise ValueError(f"--output_dir: {e}") from None
    except OSError as e:
        raise OSError(e.errno, f"--output_dir: {e.strerror}") from None
