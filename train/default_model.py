"""The recipe of the embedded default model (muse/assets/default/): trained from nothing by this repository's code.

    muse train-default --device cpu             # the shipped model: writes muse/assets/default/ (the CPU recipe)
    muse train-default --recipe gpu             # the earlier embedded model's recipe, for a GPU
    muse train-default --recipe reduced --out /tmp/m --work /tmp/w --device cpu   # the CI-sized run
    python -m train.default_model ...           # the same command

A recipe in torchtune's sense: it sets up and runs one experiment over the library (`muse.shapes` for the domain,
`train.vq` and the training loop for the networks); nothing imports it. Its presets are data at the top.

Four stages, each deterministic from the recipe's seed:
  1. VQ-GAN (`train.vq`) on endless batches of synthetic shapes (`muse.shapes`): 64x64 images <-> 16x16 ids.
  2. Text encoder: a small CLIPTextModelWithProjection built from a config with a fixed seed and never trained; the
     tokenizer is the CLIP tokenizer (`convert`, offline). One layer, so the U-ViT's context (the penultimate hidden
     states) is the token + position embeddings themselves: every word reaches the U-ViT unmixed.
  3. Data: a folder of rendered training images (PNG) with their captions in metadata.jsonl.
  4. U-ViT: trained with the project's training loop (`train.train`, the loop behind `python -m train`) on that
     folder, pre-encoded once through the stage-1 VQ-GAN and the stage-2 text encoder, with conditioning dropout
     so that classifier-free guidance works.
Then the four components are written in our checkpoint format (`convert.save_components`), weights stored in fp16
to fit the size budget (the VQ-GAN and text encoder are rounded to fp16 *before* stage 4, so the U-ViT trains on
exactly the tokens and text features the shipped files produce), and evaluated: the VQ-GAN's PSNR and codebook use
on held-out images, and prompt adherence on held-out combinations (`muse.shapes.evaluate`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from convert import Components, load_components, save_components
from convert.components import default_scheduler_config
from convert.ours import WEIGHTS
from convert.safe_load import read_safetensors
from convert.text_encoder import load_tokenizer
from muse import Pipeline
from muse.shapes import JITTER, MODEL_DIR, captions, render, sample_scenes, stream
from muse.shapes.evaluate import evaluate_adherence
from muse.shapes.figures import figure_curve, make_figures
from muse.shapes.judge import AdherenceReport
from uvit import UViT, UViTConfig
from vqgan import VQGAN, VQGANConfig

from .config import TrainConfig
from .loop import compiled, train
from .vq import (
    VQTrainConfig,
    evaluate_vqgan,
    load_vqgan,
    random_crops,
    reconstruction_loss,
    save_vqgan,
    train_vqgan,
    vq_step,
)

log = logging.getLogger("train.default")

SIZE_BUDGET_BYTES = 20 * 1024 * 1024
VQ_EVAL_SEED = 777  # held-out images for the VQ-GAN's PSNR


@dataclass
class TextEncoderConfig:
    """The frozen, randomly initialised CLIP text tower (transformers CLIPTextConfig fields)."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 1
    num_attention_heads: int = 2
    projection_dim: int = 32

    def build(self, seed: int) -> nn.Module:
        cfg = CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,  # as the published config: pooled at the first 49407
            **asdict(self),
        )
        torch.manual_seed(seed)
        return CLIPTextModelWithProjection(cfg).requires_grad_(False).eval()


def shapes_vqgan_config(**overrides) -> VQGANConfig:
    """The VQ-GAN of the embedded default model: 64x64 images -> 16x16 ids (factor 4), 512 codes of 16 dims."""
    base = dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        latent_channels=16,
        num_vq_embeddings=512,
        norm_num_groups=16,
        sample_size=64,
    )
    base.update(overrides)
    return VQGANConfig(**base)


def shipped_vq_training() -> VQTrainConfig:
    """How the shipped VQ-GAN trains: 3000 steps of 256 images."""
    return VQTrainConfig(
        steps=3000, batch_size=256, lr=1e-3, betas=(0.9, 0.99), warmup=100, restart_every=100, log_every=250
    )


def cpu_vqgan_config() -> VQGANConfig:
    """The VQ-GAN of the CPU recipe: 64x64 images -> 16x16 ids (factor 4) through three levels of 32 channels with
    no ResNet blocks in the encoder (the decoder keeps one per level), 512 codes of 16 dimensions."""
    return shapes_vqgan_config(block_out_channels=(32, 32, 32), layers_per_block=0, norm_num_groups=8)


def cpu_vq_training() -> VQTrainConfig:
    """How the CPU recipe's VQ-GAN trains: 4800 steps of 16 images, 32x32 crops for the first 75% of the steps,
    the reconstruction loss weighted up on edges, the codebook started from encoder outputs."""
    return VQTrainConfig(
        steps=4800,
        batch_size=16,
        lr=1e-3,
        betas=(0.9, 0.99),
        warmup=100,
        restart_every=50,
        log_every=400,
        edge_weight=1.0,
        init_codes="data",
        crop_size=32,
        crop_until=0.75,
    )


def shapes_uvit_config(**overrides) -> UViTConfig:
    """The U-ViT of the embedded default model: 16x16 tokens, brought to 8x8 inside (as amused-512 does with 32x32),
    2 ConvNeXt blocks per side (their 3x3 depthwise convs tell each of the 8x8 cells which third of the image it is
    in, the resolution of the captions' positions: the U-ViT has no position embedding), 4 transformer layers of
    160, 512 codes + the mask token. About 3M parameters."""
    base = dict(
        hidden_size=160,
        cond_embed_dim=32,
        micro_cond_encode_dim=16,
        micro_cond_embed_dim=80,
        encoder_hidden_size=32,
        vocab_size=513,
        codebook_size=512,
        in_channels=64,
        block_out_channels=64,
        num_res_blocks=2,
        downsample=True,
        upsample=True,
        block_num_heads=2,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=480,
        sample_size=16,
    )
    base.update(overrides)
    return UViTConfig(**base)


@dataclass
class Recipe:
    """Everything that determines the model. The defaults are the GPU recipe's (`Recipe.gpu()`, the embedded model
    until 2026-12-07); the shipped model is the CPU recipe's (`Recipe.shipped()` is `Recipe.cpu()`)."""

    seed: int = 0
    vq_config: VQGANConfig = field(default_factory=shapes_vqgan_config)
    vq_train: VQTrainConfig = field(default_factory=shipped_vq_training)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    uvit_config: UViTConfig = field(default_factory=shapes_uvit_config)
    num_images: int = 64_000  # training images written for the U-ViT
    # how far (pixels, each axis) the U-ViT's training shapes move off their grid points (muse.shapes.sample_scenes);
    # the VQ-GAN always trains on the domain's JITTER
    jitter: float = JITTER
    batch_size: int = 1024
    steps: int = 2800
    learning_rate: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    cond_dropout: float = 0.1
    max_grad_norm: float = 1.0
    store_dtype: str = "float16"  # dtype of the shipped weight files
    # sampling defaults the model folder declares (scheduler/config.json): this small model follows prompts best at
    # a low guidance scale and re-masking temperature (measured in docs/default_model.md); calls that pass their own
    # values override them
    sampling_defaults: dict = field(default_factory=lambda: {"guidance_scale": 2.0, "temperature": [1.0, 0.0]})
    vq_eval_images: int = 1024  # held-out images for the VQ-GAN's PSNR and codebook usage
    workers: int = 4  # data loader processes of the U-ViT stage
    label_smoothing: float = 0.0
    loss_per_sample: bool = False  # the loop's --loss_per_sample: every sample weighs alike, whatever its masking ratio
    masking_schedule: str = "cosine"  # the loop's --masking_schedule: how each sample's masking ratio is drawn
    compile: bool = False  # torch.compile the U-ViT's training step (the loop's --compile)
    text_context: int = 77  # tokens per caption (the tokenizer's model_max_length, declared in the model folder)
    # the learning curve: the loop checkpoints the U-ViT every steps // curve_points steps (and at the end), and each
    # checkpoint's held-out adherence is measured after the run, against the wall-clock minutes at which it was
    # written (0 = only the final model is evaluated)
    curve_points: int = 0

    @classmethod
    def shipped(cls) -> "Recipe":
        """The recipe of muse/assets/default/: the CPU recipe, whose output on a 2-core CPU is the shipped folder."""
        return cls.cpu()

    @classmethod
    def gpu(cls) -> "Recipe":
        """The GPU recipe (batches of 1024, 2800 steps: about 9 minutes on one H100, 39 hours on a 2-core CPU)."""
        return cls()

    @classmethod
    def cpu(cls) -> "Recipe":
        """The recipe for a 2-core CPU in under an hour (docs/default_model.md): the small-codebook VQ-GAN trained on
        crops, and a 2M-parameter U-ViT with a sincos position embedding trained on 12,000 batches of 32 (14,000
        until 2026-12-07's evening: over the hour on this machine at its slower speeds)."""
        return cls(
            vq_config=cpu_vqgan_config(),
            vq_train=cpu_vq_training(),
            uvit_config=shapes_uvit_config(
                hidden_size=128,
                intermediate_size=384,
                position_embedding="sincos",
            ),
            num_images=32_000,
            batch_size=32,
            steps=12_000,
            learning_rate=2e-3,
            warmup=100,
            label_smoothing=0.1,
            loss_per_sample=True,  # follows prompts better than the token mean (docs/default_model.md)
            workers=0,
            curve_points=6,
            compile=True,
            text_context=16,
            # chosen on the training combinations (docs/default_model.md): 32 steps at sampling temperature 0.5
            # draw cleaner outlines than the 12 steps at temperature 1 of the GPU recipe, and 24 refinement passes
            # (re-masking 60% of the tokens down to 10%) clean the outlines further
            sampling_defaults={
                "guidance_scale": 2.0,
                "temperature": [1.0, 0.0],
                "num_inference_steps": 32,
                "sampling_temperature": 0.5,
                "refine_steps": 24,
                "refine_ratio": [0.6, 0.1],
            },
        )

    @classmethod
    def reduced(cls) -> "Recipe":
        """A run of a minute or two on a CPU (tests, CI): the same stages at toy sizes and step counts."""
        return cls(
            vq_config=VQGANConfig(
                block_out_channels=(8, 16, 16),
                layers_per_block=1,
                latent_channels=4,
                num_vq_embeddings=32,
                norm_num_groups=4,
                sample_size=64,
            ),
            vq_train=VQTrainConfig(steps=30, batch_size=8, lr=2e-3, warmup=5, restart_every=10, log_every=10),
            text_encoder=TextEncoderConfig(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16
            ),
            uvit_config=shapes_uvit_config(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                in_channels=16,
                block_out_channels=16,
                block_num_heads=1,
                num_res_blocks=1,
                cond_embed_dim=16,
                encoder_hidden_size=16,
                micro_cond_encode_dim=4,
                micro_cond_embed_dim=20,
                codebook_size=32,
                vocab_size=33,
            ),
            num_images=64,
            batch_size=16,
            steps=30,
            learning_rate=3e-3,
            warmup=3,
            vq_eval_images=32,
            workers=0,
        )

    def to_dict(self) -> dict:
        return asdict(self)


RECIPES = {"shipped": Recipe.shipped, "cpu": Recipe.cpu, "gpu": Recipe.gpu, "reduced": Recipe.reduced}


# --- pieces ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_uvit_(model: UViT, seed: int, std: float = 0.02) -> UViT:
    """Initialise a U-ViT for training from scratch: every Linear / conv / embedding weight ~ N(0, std) (truncated at
    2 std), the conditioning modulations zero (every block starts unmodulated), norms at one, GRN and biases zero."""
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
            w = module.weight
            if name.endswith("modulation"):
                w.zero_()
            else:
                w.copy_((torch.randn(w.shape, generator=g) * std).clamp(-2 * std, 2 * std))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model


def round_to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round the floating-point weights to `dtype` and back (in place), so the fp32 module computes what its stored
    `dtype` files will."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return module


def write_training_folder(
    folder: Path, num_images: int, seed: int, device="cpu", progress: bool = False, jitter: float = JITTER
) -> Path:
    """num_images rendered training scenes (`jitter`: see `muse.shapes.sample_scenes`) as PNG files +
    metadata.jsonl (file_name, text). Reused when a folder written with the same (num_images, seed, jitter) is
    there."""
    folder = Path(folder)
    stamp = folder / "shapes.json"
    want = {"num_images": num_images, "seed": seed, "split": "train", "jitter": jitter}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        log.info("training images: reusing %s", folder)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    scenes = sample_scenes(num_images, seed, "train", jitter=jitter)
    texts = captions(scenes)
    rows = []
    chunk = 1024
    for start in tqdm(range(0, num_images, chunk), desc="images", unit="chunk", disable=not progress):
        pixels = (render(scenes[start : start + chunk], device) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for i, array in enumerate(pixels, start):
            name = f"{i:06d}.png"
            Image.fromarray(array).save(folder / name)
            rows.append(json.dumps({"file_name": name, "text": texts[i]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    stamp.write_text(json.dumps(want))
    log.info("training images: wrote %d to %s", num_images, folder)
    return folder


def save_stages(folder: Path, vqvae: VQGAN, text_encoder: nn.Module) -> Path:
    """The results of stages 1-2 (folder/vqvae, folder/text_encoder), so a later run can start at stage 3."""
    save_vqgan(vqvae, folder / "vqvae")
    text_encoder.save_pretrained(str(folder / "text_encoder"))
    return folder


def load_stages(folder: Path) -> tuple[VQGAN, nn.Module]:
    """(VQ-GAN, text encoder) from a `save_stages` folder or from a model folder in our format."""
    if (folder / "muse.json").is_file():
        c = load_components(str(folder))
        return c.vqvae.eval(), c.text_encoder.requires_grad_(False).eval()
    text_encoder = CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
    return load_vqgan(folder / "vqvae"), text_encoder.float().requires_grad_(False).eval()


def weights_digest(*modules: nn.Module) -> str:
    """A short hash of the modules' tensors (names, shapes, values)."""
    h = hashlib.sha256()
    for m in modules:
        for name, t in sorted(m.state_dict().items()):
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --- the stages -------------------------------------------------------------------------------------------------------


def train_vq_stage(recipe: Recipe, device, progress: bool) -> tuple[VQGAN, list[dict]]:
    torch.manual_seed(recipe.seed)
    model = VQGAN(recipe.vq_config).to(device)
    cfg = recipe.vq_train
    images = (x for x, _ in stream(cfg.batch_size, recipe.seed, "train", device, with_captions=False))
    history = train_vqgan(model, images, cfg, progress=progress, log=log.info)
    return model.cpu().eval(), history


def vq_report(vqvae: VQGAN, device, num_images: int = 1024) -> dict:
    held = render(sample_scenes(num_images, VQ_EVAL_SEED, split="heldout"))
    report = evaluate_vqgan(vqvae.to(device), held.to(device))
    vqvae.cpu()
    return report


def train_uvit_stage(recipe: Recipe, components, data: Path, work: Path, device: str, progress: bool):
    """Train components.transformer in place with the project's loop; returns the loop's TrainResult."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # the loop wants an explicit device index
        dev = torch.device("cuda", torch.cuda.current_device())
    cuda = dev.type == "cuda"
    cfg = TrainConfig(
        instance_data_dir=str(data),
        resolution=64,
        pre_encode=True,
        train_batch_size=recipe.batch_size,
        max_train_steps=recipe.steps,
        output_dir=str(work / "uvit"),
        logging_steps=max(1, min(250, recipe.steps // 4)),
        # one checkpoint at the end, or one per point of the learning curve
        checkpointing_steps=max(1, recipe.steps // recipe.curve_points) if recipe.curve_points else recipe.steps,
        label_smoothing=recipe.label_smoothing,
        loss_per_sample=recipe.loss_per_sample,
        masking_schedule=recipe.masking_schedule,
        seed=recipe.seed,
        learning_rate=recipe.learning_rate,
        lr_scheduler="cosine",
        lr_warmup_steps=recipe.warmup,
        adam_beta2=0.99,
        adam_weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm,
        cond_dropout_prob=recipe.cond_dropout,
        mixed_precision="no",  # fp32 (TF32 products on a GPU): the pre-encoded text features are those of inference
        allow_tf32=cuda,
        dataloader_num_workers=recipe.workers,
        compile=recipe.compile,
        device=str(dev),
    )
    return train(cfg, components)


def preflight(recipe: Recipe, device, steps: int = 10) -> dict:
    """Measured seconds per training step of the VQ-GAN (with its data) and of the U-ViT (random inputs, the loop's
    precision; compiled when the recipe compiles it, the compilation timed apart), after 3 warm-up steps, and the
    training time they project. Nothing here is kept."""

    def sync():
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    def clock(step) -> tuple[float, float]:
        """(seconds per step, seconds of the 3 warm-up steps)"""
        t = time.perf_counter()
        for _ in range(3):
            step()
        sync()
        warmup = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return (time.perf_counter() - t) / steps, warmup

    vq = VQGAN(recipe.vq_config).to(device)
    opt = torch.optim.Adam(vq.parameters())
    vq_cfg = recipe.vq_train
    batches = stream(vq_cfg.batch_size, 12345, "train", device, with_captions=False)
    crop_gen = torch.Generator().manual_seed(0)

    def vq_train_step(crop: int = 0):
        x = next(batches)[0]
        if crop:
            x = random_crops(x, crop, vq.config.downsample_factor, crop_gen)
        x_hat, q, _ = vq_step(vq, x)
        (reconstruction_loss(x, x_hat) + q.codebook_loss + q.commitment_loss).backward()
        opt.step()
        opt.zero_grad()

    cfg, B = recipe.uvit_config, recipe.batch_size
    uvit = UViT(cfg).to(device)
    opt_u = torch.optim.AdamW(uvit.parameters())
    forward = compiled(uvit, torch.device(device)) if recipe.compile else uvit  # as the loop compiles it
    ids = torch.randint(cfg.vocab_size, (B, cfg.sample_size, cfg.sample_size), device=device)
    text = torch.randn(B, recipe.text_context, cfg.encoder_hidden_size, device=device)
    pooled = torch.randn(B, cfg.cond_embed_dim, device=device)
    micro = torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]], device=device).expand(B, -1)
    if str(device).startswith("cuda"):  # as the U-ViT stage trains: fp32 with TF32 matrix products
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def uvit_train_step():
        logits = forward(ids.clamp(max=cfg.codebook_size), text, pooled, micro)
        loss = torch.nn.functional.cross_entropy(logits, ids.clamp(max=cfg.codebook_size - 1))
        loss.backward()
        opt_u.step()
        opt_u.zero_grad()

    crop_steps = vq_cfg.crop_steps
    vq_crop_s = clock(lambda: vq_train_step(vq_cfg.crop_size))[0] if crop_steps else 0.0
    vq_s = clock(vq_train_step)[0]
    uvit_s, uvit_warmup = clock(uvit_train_step)
    # what compiling costs beyond three steps (none without it)
    compile_s = max(0.0, uvit_warmup - 3 * uvit_s) if recipe.compile else 0.0
    return {
        "vq_crop_seconds_per_step": vq_crop_s,
        "vq_seconds_per_step": vq_s,
        "uvit_seconds_per_step": uvit_s,
        "uvit_compile_seconds": compile_s,
        "projected_training_seconds": vq_crop_s * crop_steps
        + vq_s * (vq_cfg.steps - crop_steps)
        + compile_s
        + uvit_s * recipe.steps,
    }


def report_path(work) -> Path:
    return Path(work) / "report.json"


def write_report(work, report: dict) -> None:
    report_path(work).write_text(json.dumps(report, indent=1))


def build(
    recipe: Recipe,
    out: Path,
    work: Path,
    device: str = "cpu",
    tokenizer_dir: str | None = None,
    progress: bool = True,
    reuse: Path | None = None,
) -> dict:
    """Run the four stages and write the model to `out` (replaced). Returns a report dict (also work/report.json).
    With `reuse` (a model folder of an earlier run), its VQ-GAN and text encoder replace stages 1 and 2."""
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    store = getattr(torch, recipe.store_dtype)
    report: dict = {"recipe": recipe.to_dict(), "device": str(device), "torch": torch.__version__}
    t0, wall0 = time.perf_counter(), time.time()

    if reuse is None:
        log.info("stage 1/4: VQ-GAN, %d steps of %d images", recipe.vq_train.steps, recipe.vq_train.batch_size)
        vqvae, vq_history = train_vq_stage(recipe, device, progress)
        round_to(vqvae, store)
        report["vq_train_seconds"] = round(time.perf_counter() - t0, 1)
        log.info("stage 1/4 done in %.0f s", report["vq_train_seconds"])
        report["vq_final_loss"] = vq_history[-1]["rec"]
        report["vq_first_loss"] = vq_history[0]["rec"]
        log.info("stage 2/4: frozen text encoder and tokenizer")
        text_encoder = round_to(recipe.text_encoder.build(recipe.seed), store)
        save_stages(work / "stages", vqvae, text_encoder)
    else:
        log.info("stages 1-2: the VQ-GAN and text encoder of %s", reuse)
        vqvae, text_encoder = load_stages(Path(reuse))
        report["reused"] = str(reuse)
        report["curve_origin"] = "stage 3"
        t0, wall0 = time.perf_counter(), time.time()  # times count from here: stages 1-2 were not run
    report["vq"] = vq_report(vqvae, device, recipe.vq_eval_images)
    log.info("VQ-GAN: %s", report["vq"])
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.model_max_length = recipe.text_context  # saved with it: the model folder declares its context

    log.info("stage 3/4: %d training images", recipe.num_images)
    t1 = time.perf_counter()
    data = write_training_folder(work / "data", recipe.num_images, recipe.seed, device, progress, recipe.jitter)
    report["data_seconds"] = round(time.perf_counter() - t1, 1)
    log.info("stage 3/4 done in %.0f s", report["data_seconds"])

    log.info("stage 4/4: U-ViT, %d steps of %d", recipe.steps, recipe.batch_size)
    torch.manual_seed(recipe.seed)
    transformer = init_uvit_(UViT(recipe.uvit_config), recipe.seed)
    # the source names the VQ-GAN and text encoder: the loop's pre-encoded cache is keyed on it
    source = f"train.default_model (VQ-GAN and text encoder {weights_digest(vqvae, text_encoder)})"
    components = Components(
        transformer,
        vqvae,
        text_encoder,
        tokenizer,
        {
            **default_scheduler_config(recipe.uvit_config.mask_token_id),
            "sampling_defaults": dict(recipe.sampling_defaults),
        },
        source=source,
    )
    for old in (work / "uvit").glob("*checkpoint-*"):  # no checkpoints of an earlier run (its pre-encoded cache stays)
        shutil.rmtree(old)
    t2 = time.perf_counter()
    result = train_uvit_stage(recipe, components, data, work, device, progress)
    report["uvit_train_seconds"] = round(time.perf_counter() - t2, 1)
    log.info("stage 4/4 done in %.0f s", report["uvit_train_seconds"])
    # when each of the loop's checkpoints was written, in seconds since the recipe started (for the curve)
    report["checkpoint_seconds"] = {
        ck.name: round((ck / "state.json").stat().st_mtime - wall0, 1) for ck in (work / "uvit").glob("checkpoint-*")
    }
    report["uvit_losses"] = {
        "first": result.losses[0],
        "last": result.losses[-1],
        "every": result.losses[:: max(1, len(result.losses) // 50)],
    }
    # the loop frees the VQ-GAN and the text encoder after pre-encoding: put ours back
    components = Components(
        transformer.cpu().eval(), vqvae, text_encoder, tokenizer, components.scheduler_config, source=components.source
    )

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    components.to(dtype=store)
    save_components(components, tmp)
    components.to(dtype=torch.float32)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    report["model_bytes"] = folder_bytes(out)
    report["parameters"] = components.num_parameters()
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    log.info("wrote %s: %.2f MB, parameters %s", out, report["model_bytes"] / 2**20, report["parameters"])
    if report["model_bytes"] > SIZE_BUDGET_BYTES:
        log.warning("the model is over the %d MB budget", SIZE_BUDGET_BYTES // 2**20)
    write_report(work, report)
    return report


def evaluate(model_dir: Path, device: str = "cpu", per_triple: int = 2, progress: bool = True) -> dict:
    """Held-out adherence (default sampling settings) and the shipped VQ-GAN's PSNR, from the files in `model_dir`."""
    pipe = Pipeline.from_pretrained(model_dir, device=device)
    ev = evaluate_adherence(pipe, per_triple=per_triple, progress=progress)
    return {"adherence": asdict(ev.report), "vq": vq_report(pipe.vqvae, device)}


def learning_curve(
    model_dir: Path, work: Path, report: dict, device: str = "cpu", per_triple: int = 2, final: dict | None = None
) -> list[dict]:
    """Held-out adherence (the model's default sampling) of each U-ViT checkpoint of the run in `work`, rounded to
    the shipped dtype (as the final model is), with the VQ-GAN and text encoder of `model_dir`; each against the
    minutes since the recipe started at which the checkpoint was written (report["checkpoint_seconds"]; after a
    `--reuse` run, since stage 3 started: report["curve_origin"]).

    `final`: the final model's evaluation on the same prompts (`evaluate(...)["adherence"]`, per_triple alike), taken
    as the point of the last step's checkpoint instead of evaluating it again: the final model is that checkpoint
    (tests/test_default_model.py checks that the two evaluations agree)."""
    seconds = report.get("checkpoint_seconds")
    if not seconds:
        raise ValueError("the report has no checkpoint_seconds: build with the recipe's curve_points > 0")
    pipe = Pipeline.from_pretrained(model_dir, device=device)
    store = getattr(torch, report["recipe"]["store_dtype"])
    steps = {name: int(name.split("-")[1]) for name in seconds}  # checkpoint-<step>
    curve = []
    for name in sorted(seconds, key=steps.get):
        if final is not None and steps[name] == report["recipe"]["steps"]:
            scored = AdherenceReport(**final)
        else:
            state = read_safetensors(work / "uvit" / name / WEIGHTS)
            with torch.no_grad():
                pipe.transformer.load_state_dict({k: v.to(store).to(pipe.transformer.dtype) for k, v in state.items()})
            scored = evaluate_adherence(pipe, per_triple=per_triple, progress=False).report
        row = {
            "step": steps[name],
            "minutes": round(seconds[name] / 60, 2),
            "accuracy": scored.accuracy,
            "per_attribute": scored.per_attribute,
            "all_right": scored.all_right,
            "prompts": scored.num_images,
        }
        log.info(
            "curve: step %d at %.1f min: held-out adherence %.1f%%", row["step"], row["minutes"], 100 * row["accuracy"]
        )
        curve.append(row)
    return curve


def curve_title(report: dict) -> str:
    origin = "since the recipe started" if report.get("curve_origin") != "stage 3" else "since stage 3 (--reuse)"
    return f"muse train-default: held-out adherence against minutes {origin}, device {report.get('device', '?')}"


def main(argv=None, prog: str = "python -m train.default_model") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="shipped", choices=sorted(RECIPES))
    p.add_argument("--out", default=None, help="model folder to write (default: the embedded model's folder)")
    p.add_argument(
        "--work", default="outputs/default_model", help="scratch folder: training images, loop checkpoints, report"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default=None, help="a CLIP tokenizer folder (default: built offline from open_clip)")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument(
        "--reuse",
        default=None,
        metavar="DIR",
        help="take the VQ-GAN and text encoder from this model folder or WORK/stages folder (skip stages 1-2)",
    )
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--eval-per-triple", type=int, default=2)
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="time a few steps of each stage first and stop if the projected training time (the VQ-GAN's and the "
        "U-ViT's steps; not the images, the pre-encoding or the evaluation) exceeds this",
    )
    p.add_argument(
        "--figures",
        default=None,
        metavar="DIR",
        help="only draw the README figures of --out into DIR (e.g. docs), and the learning curve of WORK/report.json",
    )
    p.add_argument(
        "--curve",
        action="store_true",
        help="only evaluate the learning curve of WORK's checkpoints (with --out's model) into WORK/report.json",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.figures:
        for path in make_figures(args.out, Path(args.figures)):
            print(path)
        report_file = report_path(args.work)
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        if report.get("curve"):
            print(figure_curve(report["curve"], Path(args.figures) / "default_model_curve.svg", curve_title(report)))
        return 0
    if args.out is None:
        args.out = MODEL_DIR
    if args.curve:
        report_file = report_path(args.work)
        if not report_file.is_file():
            log.error("--curve: no %s (run the recipe with this --work first)", report_file)
            return 2
        report = json.loads(report_file.read_text())
        report["curve"] = learning_curve(Path(args.out), Path(args.work), report, args.device, args.eval_per_triple)
        write_report(args.work, report)
        return 0
    recipe = RECIPES[args.recipe]()
    if args.seed is not None:  # every stage's seed: the VQ-GAN's crops and restarts too
        recipe.seed = recipe.vq_train.seed = args.seed
    if args.time_budget is not None:
        estimate = preflight(recipe, args.device)
        log.info("preflight: %s", estimate)
        if estimate["projected_training_seconds"] > args.time_budget:
            log.error(
                "projected %.0f s of training exceeds --time-budget %.0f s: stopping",
                estimate["projected_training_seconds"],
                args.time_budget,
            )
            return 3
    report = build(
        recipe, Path(args.out), Path(args.work), args.device, args.tokenizer, reuse=args.reuse and Path(args.reuse)
    )
    if not args.skip_eval:
        t = time.perf_counter()
        report["eval"] = evaluate(Path(args.out), args.device, args.eval_per_triple)
        report["eval_seconds"] = round(time.perf_counter() - t, 1)
        write_report(args.work, report)
        log.info(
            "held-out adherence %.1f%%, VQ PSNR %.2f dB, codebook usage %.1f%%",
            100 * report["eval"]["adherence"]["accuracy"],
            report["eval"]["vq"]["psnr"],
            100 * report["eval"]["vq"]["usage"],
        )
    if recipe.curve_points and not args.skip_eval:
        final = report["eval"]["adherence"]  # the last checkpoint's point: the final model, evaluated just above
        report["curve"] = learning_curve(
            Path(args.out), Path(args.work), report, args.device, args.eval_per_triple, final
        )
        write_report(args.work, report)
    print(json.dumps({k: v for k, v in report.items() if k != "recipe"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
