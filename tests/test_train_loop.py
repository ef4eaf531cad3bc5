"""The training loop on tiny models (CPU, seconds): it learns, resumes exactly, survives a crash mid-save, drops
conditioning the right way round, trains with 8-bit AdamW and from a pre-encoded cache; optimizer groups and EMA
as the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from convert.components import Components
from train import checkpoint
from train.config import TrainConfig
from train.loop import batch_conditioning, train
from uvit import UViT, UViTConfig
from vqgan import VQGAN, VQGANConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red cube", "a blue ball", "green grass", "yellow sun"]


@pytest.fixture(scope="module")
def tokenizer():
    from convert.clip_tokenizer import offline_clip_tokenizer

    return offline_clip_tokenizer()


def tiny_components(tokenizer, seed: int = 0) -> Components:
    """A tiny aMUSEd (32 px images, 8x8 tokens, 64 codes), the same weights for the same seed."""
    from tests.helpers import randomize_, reference_text_encoder

    torch.manual_seed(seed)
    transformer = UViT(UViTConfig.tiny())
    vqvae = randomize_(VQGAN(VQGANConfig.tiny()), seed + 1)
    return Components(transformer, vqvae, reference_text_encoder("tiny-256", seed + 2), tokenizer, {}, "tiny")


def make_images(folder: Path, prompts=PROMPTS, broken: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, p in enumerate(prompts):
        h, w = (40, 32) if i % 2 else (32, 48)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{p}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


def config(tmp_path: Path, images: Path, **overrides) -> TrainConfig:
    base = dict(
        instance_data_dir=str(images),
        resolution=32,
        train_batch_size=4,
        learning_rate=1e-2,
        seed=0,
        output_dir=str(tmp_path / "out"),
        logging_steps=1000,
        checkpointing_steps=1000,
        max_train_steps=4,
    )
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.slow
def test_small_model_overfits_a_few_images(tmp_path, tokenizer):
    """4 images, batch 4, lr 1e-2: within 100 steps the loss (mean of the last 10) falls at least 2.5x below the
    first step's (about ln 64 = 4.16 at the start)."""
    cfg = config(tmp_path, make_images(tmp_path / "img"), max_train_steps=100)
    result = train(cfg, tiny_components(tokenizer))
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    assert first > 3.5
    assert last < first / 2.5, (first, last)
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


def test_loss_per_sample_reaches_the_loss_and_trains(tmp_path, tokenizer):
    """--loss_per_sample: the same masks and weights give another first-step loss (the samples' masking ratios
    differ), and the run trains."""
    images = make_images(tmp_path / "img")
    token_mean = train(config(tmp_path / "a", images, max_train_steps=20), tiny_components(tokenizer))
    per_sample = train(
        config(tmp_path / "b", images, max_train_steps=20, loss_per_sample=True), tiny_components(tokenizer)
    )
    assert abs(per_sample.losses[0] - token_mean.losses[0]) > 1e-4
    assert all(np.isfinite(per_sample.losses))
    assert sum(per_sample.losses[-5:]) / 5 < per_sample.losses[0], per_sample.losses


def test_masking_schedule_reaches_the_masks_and_trains(tmp_path, tokenizer):
    """--masking_schedule linear: other masks from the same draws, so another first-step loss; the run trains."""
    images = make_images(tmp_path / "img")
    cosine = train(config(tmp_path / "a", images, max_train_steps=20), tiny_components(tokenizer))
    linear = train(
        config(tmp_path / "b", images, max_train_steps=20, masking_schedule="linear"), tiny_components(tokenizer)
    )
    assert abs(linear.losses[0] - cosine.losses[0]) > 1e-4
    assert sum(linear.losses[-5:]) / 5 < linear.losses[0], linear.losses


def test_unreadable_image_is_skipped_and_counted_never_a_crash(tmp_path, tokenizer):
    cfg = config(tmp_path, make_images(tmp_path / "img", broken=True), max_train_steps=3)
    result = train(cfg, tiny_components(tokenizer))
    assert result.step == 3 and all(np.isfinite(result.losses))
    # 5 files, 12 samples drawn: the broken one is met at least twice (once per epoch of 5)
    assert result.skipped_images >= 2 and result.skipped_names == {str(tmp_path / "img" / "broken.png")}


@pytest.mark.slow
def test_dataloader_workers_change_nothing(tmp_path, tokenizer):
    """Crops are seeded per sample position, not per worker: 2 workers train exactly as the main process alone."""
    images = make_images(tmp_path / "img")
    alone = train(config(tmp_path / "a", images, max_train_steps=3), tiny_components(tokenizer))
    workers = train(
        config(tmp_path / "b", images, max_train_steps=3, dataloader_num_workers=2), tiny_components(tokenizer)
    )
    assert workers.losses == alone.losses


def _checkpoint_files(path: Path) -> dict:
    out = {"model": load_file(str(path / "model.safetensors"))}
    for name in ("ema", "text_encoder"):
        if (path / f"{name}.safetensors").is_file():
            out[name] = load_file(str(path / f"{name}.safetensors"))
    out["optimizer"] = checkpoint.load_torch(path / "optimizer.pt")["state"]
    return out


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        # full fine-tune: accumulation, clipping, EMA, warm-up across the resume point, dropout of the conditioning
        dict(
            gradient_accumulation_steps=2,
            max_grad_norm=1.0,
            use_ema=True,
            lr_scheduler="constant_with_warmup",
            lr_warmup_steps=4,
            cond_dropout_prob=0.3,
            rect_mask_prob=0.3,
            label_smoothing=0.1,
        ),
        # LoRA in fp16 autocast with the grad scaler, LoRA dropout (torch RNG), cosine schedule
        dict(
            use_lora=True,
            lora_r=4,
            lora_alpha=8,
            lora_dropout=0.1,
            mixed_precision="fp16",
            lr_scheduler="cosine",
            lr_warmup_steps=2,
            learning_rate=1e-3,
        ),
        # 8-bit AdamW states (bitsandbytes) in bf16 autocast
        dict(use_8bit_adam=True, mixed_precision="bf16", learning_rate=3e-3),
        # LoRA on the U-ViT and on the text encoder, which then encodes the empty prompt with every batch
        dict(
            use_lora=True,
            lora_r=2,
            train_text_encoder=True,
            text_encoder_use_lora=True,
            text_encoder_lora_r=2,
            cond_dropout_prob=0.5,
            use_ema=True,
        ),
    ],
    ids=["full", "lora-fp16", "8bit-bf16", "text-encoder-lora"],
)
def test_resume_continues_exactly(tmp_path, tokenizer, recipe):
    """6 steps straight == 3 steps, then a new process-like run (fresh models) resumed from the checkpoint for 3."""
    images = make_images(tmp_path / "img")
    straight = train(
        config(tmp_path / "a", images, max_train_steps=6, checkpointing_steps=3, **recipe), tiny_components(tokenizer)
    )
    first = train(
        config(tmp_path / "b", images, max_train_steps=3, checkpointing_steps=3, **recipe), tiny_components(tokenizer)
    )
    second = train(
        config(
            tmp_path / "b", images, max_train_steps=6, checkpointing_steps=3, resume_from_checkpoint="latest", **recipe
        ),
        tiny_components(tokenizer),
    )
    assert first.losses + second.losses == straight.losses  # bit for bit
    _assert_same(_checkpoint_files(tmp_path / "a/out/checkpoint-6"), _checkpoint_files(tmp_path / "b/out/checkpoint-6"))


@pytest.mark.slow
def test_resume_without_a_seed_keeps_the_runs_seed(tmp_path, tokenizer):
    """--seed omitted on resume: the checkpoint's seed drives the data order, crops and masks, so the run continues
    as the uninterrupted one."""
    images = make_images(tmp_path / "img")
    straight = train(config(tmp_path / "a", images, max_train_steps=4, seed=5), tiny_components(tokenizer))
    train(config(tmp_path / "b", images, max_train_steps=2, checkpointing_steps=2, seed=5), tiny_components(tokenizer))
    resumed = train(
        config(tmp_path / "b", images, max_train_steps=4, seed=None, resume_from_checkpoint="latest"),
        tiny_components(tokenizer),
    )
    assert resumed.losses == straight.losses[2:]


CRASHING_CHILD = """
import os, sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
import train.checkpoint as ckpt
from train.loop import train
from tests.test_train_loop import tiny_components, config
from convert.clip_tokenizer import offline_clip_tokenizer
tmp, images, marker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
saves = []
real_save = ckpt.save_torch
def save_then_hang(obj, path):
    if path.name == "optimizer.pt":
        saves.append(path)
        if len(saves) == 2:  # the second checkpoint: write part of the file, then wait to be killed
            path.write_bytes(b"\\x80\\x02partial")
            marker.write_text(str(path))
            time.sleep(600)
    real_save(obj, path)
ckpt.save_torch = save_then_hang
train(config(tmp, images, max_train_steps=6, checkpointing_steps=2), tiny_components(offline_clip_tokenizer()))
"""


@pytest.mark.slow
def test_save_killed_mid_write_leaves_resume_on_the_previous_checkpoint(tmp_path, tokenizer):
    images = make_images(tmp_path / "img")
    marker = tmp_path / "saving"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_CHILD, str(tmp_path / "crash"), str(images), str(marker)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the child never reached its second checkpoint"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)  # dies in the middle of writing checkpoint-4
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    out = tmp_path / "crash" / "out"
    assert [step for step, _ in checkpoint.checkpoints(out)] == [2]
    assert any(p.name.startswith(checkpoint.TMP_PREFIX) for p in out.iterdir())  # the half-written save
    assert checkpoint.resolve(out, "latest") == out / "checkpoint-2"
    with pytest.raises(FileNotFoundError):
        checkpoint.resolve(out, "checkpoint-4")

    resumed = train(
        config(tmp_path / "crash", images, max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"),
        tiny_components(tokenizer),
    )
    straight = train(
        config(tmp_path / "ok", images, max_train_steps=4, checkpointing_steps=2), tiny_components(tokenizer)
    )
    assert resumed.losses == straight.losses[2:]
    _assert_same(_checkpoint_files(out / "checkpoint-4"), _checkpoint_files(tmp_path / "ok/out/checkpoint-4"))
    assert not any(p.name.startswith(checkpoint.TMP_PREFIX) for p in out.iterdir())  # cleaned by the next save


@pytest.mark.slow
def test_checkpoints_total_limit_keeps_the_newest(tmp_path, tokenizer):
    cfg = config(
        tmp_path,
        make_images(tmp_path / "img"),
        max_train_steps=5,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        use_lora=True,
        lora_r=2,
    )
    train(cfg, tiny_components(tokenizer))
    assert [s for s, _ in checkpoint.checkpoints(tmp_path / "out")] == [4, 5]


def test_conditioning_dropout_replaces_rows_by_the_empty_prompt_after_encoding(tokenizer):
    from muse.text import encode_text

    te = tiny_components(tokenizer).text_encoder

    def encode(prompts):
        c = encode_text(tokenizer, te, prompts)
        return c.encoder_hidden_states, c.prompt_embeds

    empty = encode([""])
    batch = {"prompt": ["a red cube", "a blue ball", "green grass"]}
    dropped = torch.tensor([False, True, False])
    hidden, pooled = batch_conditioning(batch, encode, empty, dropped, torch.device("cpu"))
    kept_h, kept_p = encode(batch["prompt"])
    assert torch.equal(hidden[1], empty[0][0]) and torch.equal(pooled[1], empty[1][0])  # dropped: the empty prompt
    assert torch.equal(hidden[[0, 2]], kept_h[[0, 2]]) and torch.equal(pooled[[0, 2]], kept_p[[0, 2]])  # kept: its own
    assert not torch.equal(hidden[1], kept_h[1])


@pytest.mark.slow
def test_dropout_probability_one_trains_exactly_as_empty_prompts(tmp_path, tokenizer):
    """p = 1 drops every prompt (the reference's inverted test would keep them all); p = 0 drops none."""
    images = make_images(tmp_path / "img")
    empty_captions = tmp_path / "empty.jsonl"
    empty_captions.write_text("".join(f'{{"file_name": "{p}.png", "text": ""}}\n' for p in PROMPTS))
    all_dropped = train(config(tmp_path / "a", images, cond_dropout_prob=1.0), tiny_components(tokenizer))
    empty_prompts = train(
        config(tmp_path / "b", images, instance_data_metadata=str(empty_captions)), tiny_components(tokenizer)
    )
    none_dropped = train(config(tmp_path / "c", images, cond_dropout_prob=0.0), tiny_components(tokenizer))
    # equal up to the ulps by which encoding "" once (batch 1) and four times (batch 4) differ in fp32
    np.testing.assert_allclose(all_dropped.losses, empty_prompts.losses, atol=1e-4, rtol=0)
    assert max(abs(a - b) for a, b in zip(none_dropped.losses, empty_prompts.losses)) > 1e-2


@pytest.mark.parametrize("te_lora", [True, False], ids=["text-encoder-lora", "text-encoder-full"])
def test_training_the_text_encoder(tmp_path, tokenizer, te_lora):
    """--train_text_encoder (LoRA on CLIP's q/k/v projections, or all of it) with conditioning dropout: the text
    encoder changes, and its weights are written next to the U-ViT's (peft layout for adapters)."""
    from safetensors import safe_open

    images = make_images(tmp_path / "img")
    comps = tiny_components(tokenizer)
    before = {n: p.detach().clone() for n, p in comps.text_encoder.named_parameters()}
    cfg = config(
        tmp_path,
        images,
        use_lora=True,
        lora_r=2,
        train_text_encoder=True,
        text_encoder_use_lora=te_lora,
        text_encoder_lora_r=2,
        cond_dropout_prob=0.5,
        max_train_steps=3,
        learning_rate=1e-2,
    )
    train(cfg, comps)
    after = dict(comps.text_encoder.named_parameters())
    if te_lora:
        assert any(n.endswith("q_proj.lora_b.weight") and float(p.detach().abs().max()) > 0 for n, p in after.items())
        with safe_open(str(tmp_path / "out/pytorch_lora_weights.safetensors"), framework="pt") as f:
            keys = list(f.keys())
        assert any(k.startswith("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A") for k in keys)
        assert any(k.startswith("transformer.") for k in keys)
    else:
        assert any(not torch.equal(before[n], after[n].detach()) for n in before)
        assert (tmp_path / "out/text_encoder/config.json").is_file()


@pytest.mark.slow
def test_8bit_adamw_on_cpu_lowers_the_loss(tmp_path, tokenizer):
    import bitsandbytes as bnb

    cfg = config(tmp_path, make_images(tmp_path / "img"), max_train_steps=40, use_8bit_adam=True, learning_rate=3e-3)
    result = train(cfg, tiny_components(tokenizer))
    first, last = result.losses[0], sum(result.losses[-10:]) / 10
    assert last < first / 1.8, (first, last)
    state = checkpoint.load_torch(tmp_path / "out/checkpoint-40/optimizer.pt")["state"]
    quantized = [s["__bnb_optimizer_quant_state__"] for s in state.values()]  # bitsandbytes' state layout
    assert any(
        q["state1"].dtype == torch.uint8 and q["state2"].dtype == torch.uint8 for q in quantized
    )  # 8-bit moments
    assert bnb.__version__


@pytest.mark.slow
def test_training_from_a_pre_encoded_cache_frees_the_encoders(tmp_path, tokenizer):
    images = make_images(tmp_path / "img", broken=True)
    comps = tiny_components(tokenizer)
    result = train(config(tmp_path, images, pre_encode=True, max_train_steps=30, cond_dropout_prob=0.1), comps)
    assert comps.vqvae is None and comps.text_encoder is None  # not resident during training
    assert sum(result.losses[-5:]) / 5 < result.losses[0] / 1.5
    cache = tmp_path / "out/pre_encoded/pre_encoded.safetensors"
    stamp = cache.stat().st_mtime_ns
    train(
        config(tmp_path, images, pre_encode=True, max_train_steps=31, resume_from_checkpoint="latest"),
        tiny_components(tokenizer),
    )
    assert cache.stat().st_mtime_ns == stamp  # same model, data and resolution: the cache is reused
    # with validation prompts the encoders are kept (off the training device) for the validation images
    comps = tiny_components(tokenizer)
    train(
        config(
            tmp_path / "v",
            images,
            pre_encode=True,
            max_train_steps=1,
            validation_prompts=["a red cube"],
            validation_steps=1,
            validation_inference_steps=2,
        ),
        comps,
    )
    assert comps.vqvae is not None and (tmp_path / "v/out/validation/step-1/00.png").is_file()


def make_square_images(folder: Path, size: int = 32, prompts=PROMPTS) -> Path:
    """Images that already have the training resolution: one crop each, so every read gives the same tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for p in prompts:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{p}.png")
    return folder


def test_automatic_pre_encoding_is_on_only_where_it_changes_nothing(tmp_path):
    """No flag: pre-encode when the text encoder is frozen, every image has a single crop at the resolution and the
    run reads every example at least once. Each refusal names its reason; an explicit flag always wins."""
    from train.data import build_source
    from train.loop import choose_pre_encode

    square = make_square_images(tmp_path / "square")

    def choose(images, world=1, **overrides):
        cfg = config(tmp_path, images, **overrides)
        return choose_pre_encode(cfg, build_source(cfg), world)

    on, why = choose(square, max_train_steps=1)  # 1 step of batch 4 reads all 4 images
    assert on and "automatic" in why
    assert choose(square, max_train_steps=2, resolution=24)[0]  # 32x32 -> 24x24 is a resize, still one crop
    off, why = choose(square, max_train_steps=1, train_batch_size=1, gradient_accumulation_steps=2)
    assert not off and "reads 2 examples of 4" in why
    assert choose(square, world=2, max_train_steps=1, train_batch_size=2)[0]  # 2 processes x 2 = 4 reads
    off, why = choose(square, max_train_steps=5, train_text_encoder=True)
    assert not off and "text encoder trains" in why
    assert choose(square, pre_encode=False)[0] is False
    assert choose(make_images(tmp_path / "mixed"), pre_encode=True)[0] is True
    off, why = choose(make_images(tmp_path / "mixed"), max_train_steps=5)  # 32x40 and 48x32: random crops
    assert not off and "a blue ball.png (32x40) has more than one crop at 32" in why
    broken = make_square_images(tmp_path / "broken")
    (broken / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    off, why = choose(broken, max_train_steps=5)
    assert not off and "zz.png cannot be read" in why


@pytest.mark.slow
def test_automatic_pre_encoding_trains_as_encoding_in_every_step(tmp_path, tokenizer):
    """Square images at the resolution and no flag: the run pre-encodes (the encoders are freed) and its losses are
    those of --no_pre_encode. On one thread they agree bit for bit; the tolerance (1e-5 relative, fp32) allows for
    the one difference in what is computed: the cache encodes the prompts and images in dataset order, the step in
    the shuffled batch, and a BLAS may round a batched matmul differently per batch composition."""
    images = make_square_images(tmp_path / "img")
    auto = tiny_components(tokenizer)
    run = dict(max_train_steps=6, cond_dropout_prob=0.3)
    pre = train(config(tmp_path / "a", images, **run), auto)
    assert auto.vqvae is None and auto.text_encoder is None  # it did pre-encode
    assert (tmp_path / "a/out/pre_encoded/pre_encoded.safetensors").is_file()
    every = train(config(tmp_path / "b", images, pre_encode=False, **run), tiny_components(tokenizer))
    assert not (tmp_path / "b/out/pre_encoded").exists()
    assert len(pre.losses) == len(every.losses) == 6
    np.testing.assert_allclose(pre.losses, every.losses, rtol=1e-5, atol=0)


@pytest.mark.parametrize("pre_encode", [True, False])
def test_a_model_folder_is_loaded_so_that_the_networks_never_peak_together(
    tmp_path, tokenizer, monkeypatch, pre_encode
):
    """From a folder, with pre-encoding: the encoders are loaded, used and freed before the U-ViT is loaded.
    Without: all three at once, the VQ decoder dropped (nothing decodes without validation). Either way the run
    is the one the same weights give when passed in memory, loss for loss. A run that finds its cache written
    loads only the U-ViT."""
    import weakref

    import convert
    import train.loop as loop

    folder = tmp_path / "model"
    comps = tiny_components(tokenizer)
    comps.scheduler_config = convert.components.default_scheduler_config(comps.transformer.config.mask_token_id)
    convert.save_components(comps, folder)
    images = make_images(tmp_path / "img")
    loads, refs = [], []

    def spy(path, **kw):
        loads.append((tuple(kw["networks"]), [ref() is not None for ref in refs]))  # which earlier ones still live
        c = convert.load_components(path, **kw)
        refs.extend(weakref.ref(m) for m in c.modules().values())
        return c

    monkeypatch.setattr(loop, "load_components", spy)
    run = dict(pre_encode=pre_encode, max_train_steps=3, cond_dropout_prob=0.5)
    from_folder = train(config(tmp_path / "a", images, pretrained_model_name_or_path=str(folder), **run))
    if pre_encode:
        assert loads == [(("vqvae", "text_encoder"), []), (("transformer",), [False, False])]
    else:
        assert loads == [(Components.MODULES, [])]
    in_memory = train(config(tmp_path / "b", images, **run), tiny_components(tokenizer))
    assert from_folder.losses == in_memory.losses and len(from_folder.losses) == 3
    if pre_encode:  # a second run on the first one's cache loads no encoder at all, and trains the same
        loads.clear()
        cache = str(tmp_path / "a" / "out" / "pre_encoded")
        again = train(
            config(tmp_path / "c", images, pretrained_model_name_or_path=str(folder), pre_encoded_dir=cache, **run)
        )
        assert [networks for networks, _ in loads] == [("transformer",)]
        assert again.losses == from_folder.losses


def test_parameter_groups_exempt_what_the_reference_exempts():
    """The reference's rule on diffusers names ("bias", "layer_norm.weight", "mlm_ln.weight", "embeddings.weight")
    applied to UVit2DModel picks the same tensors as our groups pick in our U-ViT."""
    from diffusers import UVit2DModel

    from convert.diffusers_keys import UVIT_KEYMAP
    from train.optim import NO_DECAY, decay_groups, uvit_rename

    cfg = UViTConfig.tiny()
    ours = UViT(cfg)
    theirs = UVit2DModel(**cfg.to_diffusers_dict())
    groups = decay_groups(ours.named_parameters(), 0.01, uvit_rename)
    no_decay_ours = {id(p) for p in groups[1]["params"]}
    names = {n for n, p in ours.named_parameters() if id(p) in no_decay_ours}
    expected = {n for n, _ in theirs.named_parameters() if any(nd in n for nd in NO_DECAY)}
    assert {UVIT_KEYMAP.theirs(n) for n in names} == expected and expected
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0


def test_lr_schedules():
    from train.optim import lr_multiplier

    assert [lr_multiplier("constant", 3, 10)(s) for s in (0, 5)] == [1.0, 1.0]
    assert [lr_multiplier("constant_with_warmup", 4, 10)(s) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    cos = lr_multiplier("cosine", 2, 12)
    assert cos(1) == 0.5 and cos(2) == 1.0 and abs(cos(7) - 0.5) < 1e-12 and cos(12) == 0.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_multiplier("exponential", 0, 1)


def test_ema_matches_the_reference_ema_model():
    """Our EMA and diffusers' EMAModel (what the reference script uses) on the same parameter trajectory."""
    from diffusers.training_utils import EMAModel

    from train.ema import EMA

    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, generator=g))
    ours = EMA([("p", p)], max_decay=0.99, update_after_step=2)
    ref = EMAModel([p], decay=0.99, update_after_step=2)
    for _ in range(30):
        with torch.no_grad():
            p.add_(torch.randn(5, generator=g))
        ours.update()
        ref.step([p])
        assert abs(ours.decay() - ref.cur_decay_value) < 1e-12
        torch.testing.assert_close(ours.shadow["p"], ref.shadow_params[0], atol=1e-6, rtol=0)


# --- the step made faster, not different ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe", [dict(), dict(use_8bit_adam=True, learning_rate=3e-3), dict(use_ema=True)], ids=["adamw", "8bit", "ema"]
)
def test_step_in_backward_trains_bit_for_bit_as_the_whole_model_step(tmp_path, tokenizer, monkeypatch, recipe):
    """The optimizer stepping each parameter inside the backward (train.optim.StepInBackward, on for large full
    fine-tunes) against the plain step after the backward on the same run: the same losses and the same trained
    weights, exactly; a run resumed from its checkpoint continues exactly too."""
    from train import loop, optim

    images = make_images(tmp_path / "img")
    steps = []
    original = optim.StepInBackward._step

    def counted(self, p):
        steps.append(1)
        original(self, p)

    monkeypatch.setattr(optim.StepInBackward, "_step", counted)
    monkeypatch.setattr(loop, "STEP_IN_BACKWARD_MIN_PARAMETERS", 10**12)
    plain = train(config(tmp_path / "plain", images, checkpointing_steps=2, **recipe), tiny_components(tokenizer))
    assert not steps
    monkeypatch.setattr(loop, "STEP_IN_BACKWARD_MIN_PARAMETERS", 0)
    fused = train(config(tmp_path / "fused", images, checkpointing_steps=2, **recipe), tiny_components(tokenizer))
    n_params = len(list(UViT(UViTConfig.tiny()).parameters()))
    assert len(steps) == 4 * n_params  # every parameter, every step, inside the backward
    assert fused.losses == plain.losses
    _assert_same(
        _checkpoint_files(tmp_path / "fused" / "out" / "checkpoint-4"),
        _checkpoint_files(tmp_path / "plain" / "out" / "checkpoint-4"),
    )
    resumed = train(
        config(
            tmp_path / "resumed",
            images,
            checkpointing_steps=2,
            max_train_steps=4,
            resume_from_checkpoint=str(tmp_path / "fused" / "out" / "checkpoint-2"),
            **recipe,
        ),
        tiny_components(tokenizer),
    )
    assert resumed.losses == plain.losses[2:]


def test_step_in_backward_only_where_one_backward_makes_the_whole_gradient(tmp_path):
    from train import loop
    from train.distributed import Dist

    one = Dist(0, 1, 0, torch.device("cpu"))
    big = loop.STEP_IN_BACKWARD_MIN_PARAMETERS
    base = config(tmp_path, tmp_path)
    assert loop.steps_in_backward(base, one, big)
    assert not loop.steps_in_backward(base, one, big - 1)  # LoRA-sized: one step for all
    for change in (dict(gradient_accumulation_steps=2), dict(max_grad_norm=1.0), dict(mixed_precision="fp16")):
        assert not loop.steps_in_backward(config(tmp_path, tmp_path, **change), one, big), change
    assert not loop.steps_in_backward(base, Dist(0, 2, 0, torch.device("cpu")), big)


@pytest.mark.parametrize("alpha", [32, 8, 12])  # scaling 2, 0.5 (powers of two: the cheap order), 0.75 (the plain one)
def test_lora_forward_and_gradients_are_the_plain_formulas_bit_for_bit(alpha):
    """LoRALinear against y = x W^T + (B (A x)) * scaling written out here, forward and every gradient."""
    from uvit.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear.from_linear(torch.nn.Linear(64, 96), rank=16, alpha=alpha)
    torch.nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 40, 64, requires_grad=True)
    g = torch.randn(3, 40, 96)
    out = layer(x)
    grads = torch.autograd.grad(out, (x, layer.lora_a.weight, layer.lora_b.weight), g)
    a, b = layer.lora_a.weight.detach().requires_grad_(), layer.lora_b.weight.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    plain = torch.nn.functional.linear(x2, layer.weight, layer.bias) + (x2 @ a.T @ b.T) * (alpha / 16)
    plain_grads = torch.autograd.grad(plain, (x2, a, b), g)
    assert torch.equal(out, plain)
    for got, want in zip(grads, plain_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "ours", [{"position_embedding": "sincos"}, {"downsample": True, "upsample": True, "full_res_blocks": 1}]
)
def test_a_uvit_diffusers_cannot_hold_is_saved_in_our_layout_and_loads_back(tmp_path, tokenizer, ours):
    """A U-ViT with one of our additions (a position embedding, blocks at the token grid; diffusers' UVit2DModel has
    neither) ends its run with transformer/ in our layout, which `train.generate_images` loads into a base model of
    the same configuration."""
    from train.generate_images import load_transformer_into

    components = tiny_components(tokenizer)
    torch.manual_seed(0)
    components.transformer = UViT(UViTConfig.tiny(**ours))
    images = make_images(tmp_path / "img")
    train(config(tmp_path, images, max_train_steps=2), components)
    folder = tmp_path / "out" / "transformer"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((folder / "config.json").read_text())
    assert {key: saved[key] for key in ours} == ours
    fresh = UViT(UViTConfig.tiny(**ours))
    load_transformer_into(fresh, tmp_path / "out")
    for (name, p), q in zip(fresh.state_dict().items(), components.transformer.state_dict().values()):
        assert torch.equal(p, q.cpu()), name
    with pytest.raises(ValueError, match="another configuration"):
        load_transformer_into(UViT(UViTConfig.tiny()), tmp_path / "out")


@pytest.mark.slow
def test_compiled_step_trains_as_the_eager_step(tmp_path, tokenizer):
    """--compile runs the same computation through fused kernels: the same losses and trained weights as the eager
    loop, up to fp32 rounding. Tolerance: the tiny model's losses are about 4.2 and the weights about 0.02-1; fused
    reductions reorder fp32 sums (relative error about 1e-7 each), which four steps at lr 1e-2 keep far below 1e-4."""
    images = make_images(tmp_path / "img")
    eager = train(config(tmp_path / "eager", images), tiny_components(tokenizer))
    fused = train(config(tmp_path / "fused", images, compile=True), tiny_components(tokenizer))
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(eager.losses), rtol=0, atol=1e-4)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "fused" / "out" / weights), load_file(tmp_path / "eager" / "out" / weights)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=name)


def test_compile_without_a_cpp_compiler_is_a_clear_error(tmp_path, tokenizer, monkeypatch):
    from train import loop

    monkeypatch.setattr(loop.shutil, "which", lambda name: None)
    cfg = config(tmp_path, make_images(tmp_path / "img"), compile=True)
    with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler"):
        train(cfg, tiny_components(tokenizer))
