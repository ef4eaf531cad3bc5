"""VQ-GAN training: teach a `vqgan.VQGAN` to turn images into codebook ids and back.

One step, for pixels x in [0, 1] (B, 3, H, W):

    z = encode_latents(x)                      (B, E, h, w)
    q = quantizer(z)                           nearest codes; q.quantized = z + sg(codes - z) (straight-through)
    x_hat = decode_latents(q.quantized)        (B, 3, H, W)
    loss = reconstruction(x, x_hat)            L1 + MSE (+ perceptual, only with user-supplied weights)
         + codebook_weight * mse(codes, sg(z))      moves the codes toward the encoder's outputs
         + commitment_weight * mse(sg(codes), z)    keeps the encoder near its codes
         + lambda * disc_weight * hinge_g(D(x_hat))  optional, from `disc_start`; lambda is the adaptive weight
                                                      |grad rec| / |grad gan| at the decoder's last layer

The patch discriminator D (when on) is trained with the hinge loss relu(1 - D(x)) + relu(1 + D(x_hat)).
Codebook usage is counted over each window of `restart_every` steps; codes no latent chose in the window are dead
and are restarted on latents of the current batch (with a little noise), and their optimiser state is cleared.

`train.default_model` trains one on the synthetic shapes (`muse.shapes`) as the first stage of its recipe.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import trange

from vqgan import VQGAN, VQGANConfig
from vqgan.model import VectorQuantizer


@dataclass
class VQTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-4
    lr_min_ratio: float = 0.05  # cosine decay to lr * this at the last step, after `warmup` steps
    warmup: int = 100
    betas: tuple[float, float] = (0.5, 0.9)
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    # edge-aware reconstruction: pixels within one pixel of an edge of x (a 3x3 neighbourhood that is not flat) weigh
    # 1 + edge_weight in the L1 and MSE terms (0 = off: every pixel weighs 1)
    edge_weight: float = 0.0
    codebook_weight: float = 1.0
    commitment_weight: float = 0.25
    # perceptual loss: only when the user supplies VGG16 weights (a torchvision `vgg16` state dict, safetensors or .pt)
    perceptual_weights: str | None = None
    perceptual_weight: float = 0.1
    # patch discriminator: off when disc_start is None
    disc_start: int | None = None
    disc_weight: float = 0.1
    disc_lr: float = 1e-4
    disc_channels: int = 64
    disc_layers: int = 3
    # codebook initialisation: "random" (the Embedding's N(0, 1)) or "data": every code set to a latent of the first
    # batch (plus restart_noise), so that quantisation keeps the images apart from the first step. With N(0, 1) codes
    # and small initial latents all latents pick the same code, and the decoder learns the mean image until the
    # first restart (docs/default_model.md)
    init_codes: str = "random"
    # crops: for the first crop_until fraction of the steps, each image of a batch is cut to a random crop_size x
    # crop_size window whose corner lies on the token grid (a multiple of the downsampling factor), so early steps
    # cost a fraction of a whole image's; whole images after that (0 = never crop). A convolutional VQ-GAN learns
    # the same local codes from crops; the last steps on whole images teach it the borders
    crop_size: int = 0
    crop_until: float = 0.75
    # dead-code restarts
    restart_every: int = 100  # window (steps) over which usage is counted; 0 = never restart
    restart_noise: float = 0.01
    log_every: int = 100
    seed: int = 0

    @property
    def crop_steps(self) -> int:
        """How many of the first steps train on crops."""
        if not 0.0 <= self.crop_until <= 1.0:
            raise ValueError(f"crop_until is a fraction of the steps in [0, 1], got {self.crop_until}")
        return round(self.crop_until * self.steps) if self.crop_size else 0

    def to_dict(self) -> dict:
        return asdict(self)


# --- losses ------------------------------------------------------------------------------------------------------


def edge_map(x: torch.Tensor, threshold: float = 1e-3) -> torch.Tensor:
    """(B, 1, H, W) float: 1 where the 3x3 neighbourhood of a pixel of x (B, C, H, W) is not flat (max - min over it
    and the channels above `threshold`), else 0. On flat-coloured scenes: the shapes' outlines, two pixels wide."""
    hi = F.max_pool2d(x, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return ((hi - lo).amax(dim=1, keepdim=True) > threshold).float()


def reconstruction_loss(
    x: torch.Tensor, x_hat: torch.Tensor, l1_weight: float = 1.0, l2_weight: float = 1.0, edge_weight: float = 0.0
) -> torch.Tensor:
    """l1_weight * L1 + l2_weight * MSE, per pixel weighted 1 + edge_weight on the edges of x (`edge_map`), the
    weighted means normalised by the mean weight (so edge_weight = 0 is the plain L1 + MSE)."""
    if not edge_weight:
        return l1_weight * F.l1_loss(x_hat, x) + l2_weight * F.mse_loss(x_hat, x)
    w = 1 + edge_weight * edge_map(x)
    w = w / w.mean()
    d = x_hat - x
    return l1_weight * (d.abs() * w).mean() + l2_weight * (d.pow(2) * w).mean()


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake)))."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean(D(fake))."""
    return -fake_logits.mean()


def adaptive_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """|d rec / d last_layer| / (|d gan / d last_layer| + 1e-4), clamped and detached: balances the GAN term so its
    gradient at the decoder's last layer has the reconstruction's size (Esser et al., taming transformers)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class PatchDiscriminator(nn.Module):
    """PatchGAN: (B, 3, H, W) -> one logit per patch (B, 1, H / 2^layers, W / 2^layers).
    conv 4x4 stride 2 -> LeakyReLU, then (layers - 1) x [conv 4x4 stride 2 -> GroupNorm -> LeakyReLU], then conv 3x3 -> 1."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(8, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)  # pixels [0, 1] -> [-1, 1]


# torchvision's vgg16 "D" configuration: channels of each 3x3 conv (each followed by ReLU), "M" = 2x2 max-pool
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def vgg16_features() -> nn.Sequential:
    """The convolutional part of VGG16 with torchvision's module indices (so its `features.*` weights load)."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16_LAYERS:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
            c = v
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """Feature distance in a frozen VGG16 (LPIPS-style: unit-normalised channels, mean squared difference at the five
    ReLU stages, equal weights). Nothing is downloaded: `weights` must be a torchvision `vgg16` state dict file
    (`.safetensors`, or a `.pt`/`.pth` read with weights_only=True); keys may carry a `features.` prefix."""

    STAGES = (4, 9, 16, 23, 30)  # end (exclusive) of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features
    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, weights: str | Path):
        super().__init__()
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"perceptual loss weights not found: {path} (supply a torchvision vgg16 state dict)"
            )
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        features = vgg16_features()[: self.STAGES[-1]]
        missing, unexpected = features.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a vgg16 state dict: missing {missing[:4]}, unexpected {unexpected[:4]}")
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        a, b = (x - self.mean) / self.std, (x_hat - self.mean) / self.std
        loss, start = x.new_zeros(()), 0
        for end in self.STAGES:
            for layer in self.features[start:end]:
                a, b = layer(a), layer(b)
            start = end
            na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            loss = loss + (na - nb).pow(2).sum(1).mean()
        return loss


# --- codebook usage and restarts -----------------------------------------------------------------------------------


class CodebookUsage:
    """Counts how often each code is chosen, over a window that `reset` starts afresh. The counts live on the device
    of the ids they count (no synchronisation per update)."""

    def __init__(self, num_codes: int):
        self.counts = torch.zeros(num_codes, dtype=torch.long)

    def update(self, ids: torch.Tensor) -> None:
        if self.counts.device != ids.device:
            self.counts = self.counts.to(ids.device)
        self.counts += torch.bincount(ids.flatten(), minlength=len(self.counts))

    def reset(self) -> None:
        self.counts.zero_()

    def dead(self) -> torch.Tensor:
        """(K,) bool: codes chosen zero times in the window."""
        return self.counts == 0

    def usage(self) -> float:
        """Fraction of codes chosen at least once in the window."""
        return float((self.counts > 0).float().mean())

    def perplexity(self) -> float:
        """exp(entropy) of the code distribution in the window: the effective number of codes in use."""
        total = self.counts.sum()
        if total == 0:
            return 0.0
        p = self.counts.float() / total
        return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


@torch.no_grad()
def restart_dead_codes(
    quantizer: VectorQuantizer,
    latents: torch.Tensor,
    dead: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: float = 0.01,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Move every dead code onto a latent vector drawn at random from `latents` (B, E, h, w), plus Gaussian noise of
    std `noise` times the latents' std; clear the optimiser's moment estimates for those rows. Returns how many."""
    idx = dead.nonzero().squeeze(1).to(quantizer.codebook.weight.device)
    if len(idx) == 0:
        return 0
    flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).float()  # (B*h*w, E)
    pick = torch.randint(len(flat), (len(idx),), generator=generator, device="cpu").to(flat.device)
    eps = torch.randn(len(idx), flat.shape[1], generator=generator, device="cpu").to(flat.device)
    weight = quantizer.codebook.weight
    weight[idx] = (flat[pick] + noise * flat.std() * eps).to(weight.dtype)
    if optimizer is not None:
        state = optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][idx] = 0
    return len(idx)


# --- the loop ----------------------------------------------------------------------------------------------------


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB over a batch of images in [0, 1] (x_hat clipped to [0, 1])."""
    mse = F.mse_loss(x_hat.clamp(0, 1).float(), x.float())
    return float(10 * torch.log10(1.0 / mse.clamp(min=1e-12)))


def vq_step(model: VQGAN, x: torch.Tensor):
    """Forward pass for training: -> (x_hat, quantizer output, latents z)."""
    z = model.encode_latents(x)
    q = model.quantizer(z)
    return model.decode_latents(q.quantized), q, z


def random_crops(x: torch.Tensor, size: int, align: int, gen: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): for each image its own window, whose top-left corner is a random multiple
    of `align` (so the crop's token grid is the image's), drawn from `gen`."""
    B, _, H, W = x.shape
    if size % align or size > min(H, W):
        raise ValueError(f"crop_size {size} must be a multiple of {align} and at most the image side {min(H, W)}")
    top = torch.randint((H - size) // align + 1, (B,), generator=gen) * align
    left = torch.randint((W - size) // align + 1, (B,), generator=gen) * align
    offsets = torch.arange(size)
    rows = (top[:, None] + offsets).to(x.device)  # (B, size)
    cols = (left[:, None] + offsets).to(x.device)
    batch = torch.arange(B, device=x.device)[:, None, None]
    # (B, C, H, W) -> (B, size, size, C) by advanced indexing -> (B, C, size, size)
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _lr_factor(step: int, cfg: VQTrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def train_vqgan(
    model: VQGAN, batches: Iterator[torch.Tensor], cfg: VQTrainConfig, progress: bool = True, log=print
) -> list[dict]:
    """Train `model` in place on `batches` (an iterator of (B, 3, H, W) pixel tensors in [0, 1] on the model's
    device) for cfg.steps steps. Returns the history: one dict of losses per step (plus usage at each window's end)."""
    device = model.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    disc = opt_d = None
    if cfg.disc_start is not None:
        disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers).to(device)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=cfg.betas)
    perceptual = PerceptualLoss(cfg.perceptual_weights).to(device) if cfg.perceptual_weights else None
    usage = CodebookUsage(model.quantizer.num_codes)
    last_layer = model.decoder.conv_out.weight
    if cfg.init_codes == "data":
        first = next(batches)
        batches = itertools.chain([first], batches)
        with torch.no_grad():
            z0 = model.encode_latents(first)
        all_codes = torch.ones(model.quantizer.num_codes, dtype=torch.bool)
        restart_dead_codes(model.quantizer, z0, all_codes, gen, max(cfg.restart_noise, 0.1))
    elif cfg.init_codes != "random":
        raise ValueError(f"init_codes must be 'random' or 'data', got {cfg.init_codes!r}")
    history: list[dict] = []
    crop_steps = cfg.crop_steps
    crop_gen = torch.Generator().manual_seed(cfg.seed + 2)
    t0 = time.time()
    for step in trange(cfg.steps, disable=not progress, desc="vq-gan"):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        x = next(batches)
        if step < crop_steps:
            x = random_crops(x, cfg.crop_size, model.config.downsample_factor, crop_gen)
        x_hat, q, z = vq_step(model, x)
        rec = reconstruction_loss(x, x_hat, cfg.l1_weight, cfg.l2_weight, cfg.edge_weight)
        if perceptual is not None:
            rec = rec + cfg.perceptual_weight * perceptual(x, x_hat)
        loss = rec + cfg.codebook_weight * q.codebook_loss + cfg.commitment_weight * q.commitment_loss
        # losses stay tensors until they are logged (no GPU synchronisation every step)
        record = {
            "step": step,
            "rec": rec.detach(),
            "codebook": q.codebook_loss.detach(),
            "commit": q.commitment_loss.detach(),
        }
        gan_on = disc is not None and step >= cfg.disc_start
        if gan_on:
            disc.requires_grad_(False)
            g = hinge_g_loss(disc(x_hat))
            lam = adaptive_weight(rec, g, last_layer)
            loss = loss + cfg.disc_weight * lam * g
            record.update(gan_g=g.detach(), gan_weight=lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if gan_on:
            disc.requires_grad_(True)
            d_loss = hinge_d_loss(disc(x), disc(x_hat.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            record["gan_d"] = d_loss.detach()
        usage.update(q.ids)
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0:
            record.update(usage=usage.usage(), perplexity=usage.perplexity())
            if step + 1 < cfg.steps:  # the last window is only measured
                record["restarted"] = restart_dead_codes(model.quantizer, z, usage.dead(), gen, cfg.restart_noise, opt)
            usage.reset()
        record["mse"] = F.mse_loss(x_hat.detach().clamp(0, 1), x)
        history.append(record)
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            last = [_floats(r) for r in history[-cfg.log_every :]]
            mean = {k: sum(r[k] for r in last) / len(last) for k in ("rec", "codebook", "commit")}
            mean["psnr"] = 10 * math.log10(1.0 / max(sum(r["mse"] for r in last) / len(last), 1e-12))
            extra = "".join(
                f" {k} {record[k]:.3g}" for k in ("usage", "perplexity", "restarted", "gan_weight") if k in record
            )
            log(
                f"vq step {step + 1}/{cfg.steps}: rec {mean['rec']:.4f} codebook {mean['codebook']:.4f} "
                f"commit {mean['commit']:.4f} psnr {mean['psnr']:.2f} dB{extra} ({time.time() - t0:.0f} s)"
            )
    model.eval()
    return [_floats(r) for r in history]


def _floats(record: dict) -> dict:
    """A history record with its tensors read out as floats (psnr derived from the batch mse)."""
    out = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
    if "mse" in out:
        out["psnr"] = 10 * math.log10(1.0 / max(out["mse"], 1e-12))
    return out


@torch.no_grad()
def evaluate_vqgan(model: VQGAN, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Reconstruction through the discrete path (encode -> ids -> decode) on `images` (N, 3, H, W):
    PSNR in dB (on the whole set), fraction of the codebook used, and the codes' perplexity."""
    model.eval()
    usage = CodebookUsage(model.quantizer.num_codes)
    se, n = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(model.device)
        ids = model.encode(x)
        usage.update(ids)
        x_hat = model.decode(ids).clamp(0, 1)
        se += float((x_hat - x).pow(2).sum())
        n += x.numel()
    mse = se / max(n, 1)
    return {
        "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
        "usage": usage.usage(),
        "perplexity": usage.perplexity(),
        "codes_used": int((usage.counts > 0).sum()),
        "num_codes": usage.counts.numel(),
    }


# --- files -----------------------------------------------------------------------------------------------------------


def save_vqgan(model: VQGAN, directory: str | Path) -> Path:
    """config.json + model.safetensors (fp32)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    save_file(
        {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors")
    )
    return d


def load_vqgan(directory: str | Path) -> VQGAN:
    d = Path(directory)
    model = VQGAN(VQGANConfig.from_dict(json.loads((d / "config.json").read_text())))
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return model.eval()
