"""Published (diffusers `save_pretrained`) pipeline folders load into ours and compute what diffusers computes.

Reference: the session's diffusers pipelines of random weights (`reference_pipelines`), and for the fp16 variant the
diffusers components loaded from the same fp16 files. Tolerances:
- U-ViT logits (fp32): max |ours - theirs| <= 1e-4 * max |theirs| (the networks' parity bound; measured 0 here);
- VQ ids exactly equal; VQ pixels <= 1e-5 absolute (fp32 convolutions, same kernels);
- text encoder: the same transformers class on the same tensors, so hidden states/pooled <= 1e-5 (measured 0);
- fp16: each fp16 op rounds to 2^-11 relative; two implementations that round at different points of a deep
  network drift apart by a few such steps per layer, so fp16 outputs must agree within 1e-2 relative to the
  output's scale (measured well below; see the test), and the loaded fp16 tensors must be bit-identical to the
  file's (no double rounding through fp32).
"""

from __future__ import annotations

import pytest
import torch

import convert
from convert.networks import uvit_to_diffusers, vqgan_to_diffusers
from convert.safe_load import read_safetensors

PROMPTS = ["a photo of a cat", "", "an astronaut riding a horse on the moon, oil painting, highly detailed " * 4]
TINY = ["tiny-256", "tiny-512"]
FULL = [pytest.param("full-256", marks=pytest.mark.full)]
# full-512 differs from full-256 only in the U-ViT (down/upsampling); its VQ-GAN and text encoder are the same configs
FULL_UVIT = FULL + [pytest.param("full-512", marks=pytest.mark.full)]
FP32_TOL = 1e-4  # relative, U-ViT logits
PIXEL_TOL = 1e-5
TEXT_TOL = 1e-5
FP16_TOL = 1e-2  # relative to the output scale


@pytest.fixture(scope="module")
def loaded(published_dirs):
    """(kind, variant) -> our Components loaded from the published folder (cached for the module)."""
    cache = {}

    def get(kind: str, variant: str | None = None):
        if (kind, variant) not in cache:
            dtype = torch.float16 if variant == "fp16" else torch.float32
            cache[kind, variant] = convert.load_components(str(published_dirs(kind)), dtype=dtype, variant=variant)
        return cache[kind, variant]

    return get


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


def uvit_inputs(cfg, batch=2, seed=0, dtype=torch.float32, side=None, text_len=77):
    g = torch.Generator().manual_seed(seed)
    side = side or min(cfg.sample_size, 8)  # a small grid keeps full-size forwards cheap
    ids = torch.randint(0, cfg.codebook_size, (batch, side, side), generator=g)
    ids[:, ::3, ::2] = cfg.mask_token_id  # some masked positions, as during sampling
    hidden = torch.randn(batch, text_len, cfg.encoder_hidden_size, generator=g).to(dtype)
    pooled = torch.randn(batch, cfg.cond_embed_dim, generator=g).to(dtype)
    micro = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]] * batch).to(dtype)
    return ids, hidden, pooled, micro


def tokens(tokenizer):
    return tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# --- fp32 -------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", TINY + FULL_UVIT)
def test_uvit_logits_match_diffusers(kind, loaded, reference_pipelines):
    ours, ref = loaded(kind).transformer, reference_pipelines(kind).transformer
    args = uvit_inputs(ours.config)
    with torch.no_grad():
        a, b = ours(*args), ref(*args)
    assert a.shape == b.shape
    assert rel_err(a, b) <= FP32_TOL


@pytest.mark.parametrize("kind", TINY + FULL)
def test_vq_ids_and_pixels_match_diffusers(kind, loaded, reference_pipelines):
    ours, ref = loaded(kind).vqvae, reference_pipelines(kind).vqvae
    f = ours.downsample_factor
    pixels = torch.rand(2, 3, 4 * f, 4 * f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids = ours.encode(pixels)
        ref_ids = ref.quantize(ref.encode(pixels).latents)[2][2].reshape(ids.shape)
        assert torch.equal(ids, ref_ids)
        px = ours.decode(ids)
        ref_px = ref.decode(ids, force_not_quantize=True, shape=(*ids.shape, ref.config.latent_channels)).sample
    assert (px - ref_px).abs().max().item() <= PIXEL_TOL


@pytest.mark.parametrize("kind", TINY + FULL)
def test_text_encoder_matches_transformers(kind, loaded, reference_pipelines):
    ours, ref = loaded(kind), reference_pipelines(kind)
    ids = tokens(ours.tokenizer)
    with torch.no_grad():
        a = ours.text_encoder(ids, output_hidden_states=True)
        b = ref.text_encoder(ids, output_hidden_states=True)
    assert (a.text_embeds - b.text_embeds).abs().max().item() <= TEXT_TOL
    assert (a.hidden_states[-2] - b.hidden_states[-2]).abs().max().item() <= TEXT_TOL


def test_tokenizer_matches_reference_and_pads_with_end_of_text(loaded, reference_pipelines):
    ours, ref = loaded("tiny-256").tokenizer, reference_pipelines("tiny-256").tokenizer
    ids = tokens(ours)
    assert torch.equal(ids, tokens(ref))
    assert ids.shape == (len(PROMPTS), 77)
    assert ids[0, -1].item() == 49407 and ids[1].tolist() == [49406] + [49407] * 76


def test_scheduler_config_and_source(loaded, published_dirs):
    c = loaded("tiny-512")
    assert c.scheduler_config == {"mask_token_id": c.transformer.config.vocab_size - 1, "masking_schedule": "cosine"}
    assert c.source == str(published_dirs("tiny-512"))
    assert set(c.dtypes().values()) == {torch.float32}


# --- the fp16 variant -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_fp16(published_dirs):
    """(kind, component) -> the diffusers/transformers component loaded from the same fp16 variant files, in fp16."""
    cache = {}

    def get(kind, name):
        if (kind, name) not in cache:
            from diffusers import UVit2DModel, VQModel
            from transformers import CLIPTextModelWithProjection

            d = published_dirs(kind)
            if name == "text_encoder":
                model = CLIPTextModelWithProjection.from_pretrained(d / name, variant="fp16", dtype=torch.float16)
            else:
                cls = UVit2DModel if name == "transformer" else VQModel
                model = cls.from_pretrained(d, subfolder=name, variant="fp16", torch_dtype=torch.float16)
            cache[kind, name] = model.eval()
        return cache[kind, name]

    return get


@pytest.mark.parametrize("kind", TINY + FULL)
def test_fp16_variant_tensors_are_the_files_bit_for_bit(kind, loaded, published_dirs):
    c, d = loaded(kind, "fp16"), published_dirs(kind)
    assert set(c.dtypes().values()) == {torch.float16}
    for ours, name in ((uvit_to_diffusers(c.transformer)[1], "transformer"), (vqgan_to_diffusers(c.vqvae)[1], "vqvae")):
        stored = read_safetensors(d / name / "diffusion_pytorch_model.fp16.safetensors")
        assert set(ours) == set(stored)
        assert all(torch.equal(ours[k], stored[k]) for k in stored), name
    stored = read_safetensors(d / "text_encoder" / "model.fp16.safetensors")
    te = c.text_encoder.state_dict()
    assert all(torch.equal(te[k], stored[k]) for k in stored)


# fp16 matmuls and convolutions are slow on a CPU without fp16 units (a 603M U-ViT forward at batch 2 on an 8x8 grid
# takes 30 s there), so these comparisons use one sample, a 4x4 token grid, 16 text positions and a 1x1 VQ grid.


@pytest.mark.parametrize("kind", TINY + FULL_UVIT)
def test_fp16_variant_uvit_matches_diffusers_fp16(kind, loaded, diffusers_fp16):
    ours, ref = loaded(kind, "fp16").transformer, diffusers_fp16(kind, "transformer")
    args = uvit_inputs(ours.config, batch=1, dtype=torch.float16, side=4, text_len=16)
    with torch.no_grad():
        a, b = ours(*args), ref(*args)
    assert a.dtype == b.dtype == torch.float16
    assert rel_err(a, b) <= FP16_TOL


@pytest.mark.parametrize("kind", TINY + FULL)
def test_fp16_variant_text_encoder_matches_transformers_fp16(kind, loaded, diffusers_fp16):
    c, ref = loaded(kind, "fp16"), diffusers_fp16(kind, "text_encoder")
    ids = tokens(c.tokenizer)[:1]
    with torch.no_grad():
        a, b = c.text_encoder(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert torch.equal(a.text_embeds, b.text_embeds)  # same class, same tensors, same kernels
    assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])


@pytest.mark.parametrize("kind", TINY + FULL)
def test_fp16_variant_vq_decoder_matches_diffusers_fp16(kind, loaded, diffusers_fp16):
    """The VQ-GAN in fp16 is known to overflow on the real weights (the reference upcasts it); its fp16 decoder
    path is compared on a 1x1 grid of ids, where these random weights stay finite."""
    ours, ref = loaded(kind, "fp16").vqvae, diffusers_fp16(kind, "vqvae")
    ids = torch.randint(0, ours.config.num_vq_embeddings, (1, 1, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ours.decode(ids)
        b = ref.decode(ids, force_not_quantize=True, shape=(1, 1, 1, ref.config.latent_channels)).sample
    assert torch.isfinite(b).all()
    assert rel_err(a, b) <= FP16_TOL


# --- our format -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ours_dir(loaded, tmp_path_factory):
    d = tmp_path_factory.mktemp("ours-tiny-512")
    convert.save_components(loaded("tiny-512"), d)
    return d


def test_our_format_round_trips_exactly(loaded, ours_dir):
    a, b = loaded("tiny-512"), convert.load_components(str(ours_dir))
    for name in ("transformer", "vqvae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert b.transformer.config == a.transformer.config and b.vqvae.config == a.vqvae.config
    assert b.scheduler_config == a.scheduler_config
    assert torch.equal(tokens(b.tokenizer), tokens(a.tokenizer))


def test_our_format_is_readable_json_and_safetensors(ours_dir):
    import json

    index = json.loads((ours_dir / "muse.json").read_text())
    assert index["format"] == "muse" and index["components"][:3] == ["transformer", "vqvae", "text_encoder"]
    cfg = json.loads((ours_dir / "transformer" / "config.json").read_text())
    assert cfg["_class"] == "uvit.UViT" and cfg["downsample"] is True
    names = set(read_safetensors(ours_dir / "transformer" / "model.safetensors"))
    assert "layers.0.attn.q.weight" in names  # our parameter names, not diffusers'


@pytest.mark.parametrize("form", ["published", "ours"])
def test_some_networks_load_alone_and_cannot_be_saved(form, loaded, ours_dir, published_dirs, tmp_path):
    """networks=...: only the named networks are built (training loads the encoders, pre-encodes, frees them and
    only then the U-ViT); they are the full load's tensors, and a partial set is refused by the writers."""
    folder = ours_dir if form == "ours" else published_dirs("tiny-512")
    full = loaded("tiny-512")
    enc = convert.load_components(str(folder), networks=("vqvae", "text_encoder"))
    assert enc.transformer is None and enc.scheduler_config == {}  # the scheduler is checked against the U-ViT
    assert set(enc.modules()) == {"vqvae", "text_encoder"}
    for name in ("vqvae", "text_encoder"):
        a, b = getattr(full, name).state_dict(), getattr(enc, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    uvit = convert.load_components(str(folder), networks=["transformer"])
    assert uvit.vqvae is None and uvit.text_encoder is None
    assert uvit.scheduler_config == full.scheduler_config and uvit.transformer.config == full.transformer.config
    with pytest.raises(ValueError, match="transformer not loaded"):
        convert.save_components(enc, tmp_path / "partial")
    with pytest.raises(ValueError, match="vqvae, text_encoder not loaded"):
        convert.export_diffusers(uvit, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()  # refused before anything is written
    for bad in ("transformer", ("unet",), ()):  # a bare string would be its letters
        with pytest.raises(ValueError, match="networks must name some of"):
            convert.load_components(str(folder), networks=bad)


@pytest.mark.slow
def test_our_format_and_published_folders_load_without_diffusers(ours_dir, published_dirs):
    """Library code never imports diffusers: load both formats with `import diffusers` made to fail."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import convert, torch\n"
        f"c = convert.load_components({str(ours_dir)!r})\n"
        f"p = convert.load_components({str(published_dirs('tiny-512'))!r})\n"
        "ids = torch.zeros(1, 8, 8, dtype=torch.long)\n"
        "out = c.transformer(ids, torch.zeros(1, 77, 32), torch.zeros(1, 32), torch.zeros(1, 5))\n"
        "assert torch.equal(out, p.transformer(ids, torch.zeros(1, 77, 32), torch.zeros(1, 32), torch.zeros(1, 5)))\n"
        "assert not any(m == 'diffusers' or m.startswith('diffusers.') for m in sys.modules if sys.modules[m] is not None)\n"
        "print('ok')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# --- tokenizer forms --------------------------------------------------------------------------------------------


def test_tokenizer_loads_from_vocab_and_merges_and_without_files(tmp_path, reference_pipelines):
    from convert.clip_tokenizer import write_clip_tokenizer_files
    from convert.text_encoder import load_tokenizer

    ref = tokens(reference_pipelines("tiny-256").tokenizer)
    classic = load_tokenizer(write_clip_tokenizer_files(tmp_path / "classic"))  # vocab.json + merges.txt
    rebuilt = load_tokenizer(None)  # no files: built from open_clip's merges
    empty = tmp_path / "empty"
    empty.mkdir()
    assert torch.equal(tokens(classic), ref) and torch.equal(tokens(rebuilt), ref)
    assert torch.equal(tokens(load_tokenizer(empty)), ref)


@pytest.mark.parametrize("declared, kept", [(16, 16), (77, 77), (1000, 77)])
def test_tokenizer_keeps_a_shorter_declared_context_as_the_reference_does(tmp_path, declared, kept, caplog):
    """A folder's tokenizer_config.json may declare a context shorter than CLIP's 77 positions (the embedded model's
    CPU recipe declares 16); the reference pipelines pad to the declared length, so ours do too. A longer one than
    the text encoder has positions for is set to 77, with a warning."""
    import json

    from transformers import CLIPTokenizer

    from convert.clip_tokenizer import write_clip_tokenizer_files
    from convert.text_encoder import load_tokenizer
    from muse.text import tokenize

    folder = write_clip_tokenizer_files(tmp_path / "tok")
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": declared}))
    ours = load_tokenizer(folder)
    assert ours.model_max_length == kept
    assert ("aMUSEd uses 77" in caplog.text) == (declared > 77)
    prompt = ["a small red circle at the top left on a blue background"]
    ids = tokenize(ours, prompt)
    assert ids.shape == (1, kept)
    if declared <= 77:  # the reference's tokenization: the folder's tokenizer, padded to its model_max_length
        ref = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        expected = ref(prompt, padding="max_length", max_length=ref.model_max_length, truncation=True)
        assert ids.tolist() == expected.input_ids


def test_a_prompt_longer_than_the_context_is_cut_with_a_warning_naming_it(tmp_path, caplog):
    """The reference truncates silently; with a folder's 16-token context a user's longer prompt would lose words
    unseen. The ids stay the reference's truncated ones; the warning names the prompt, once per tokenizer."""
    import json
    import logging

    from transformers import CLIPTokenizer

    from convert.clip_tokenizer import write_clip_tokenizer_files
    from convert.text_encoder import load_tokenizer
    from muse.text import tokenize

    folder = write_clip_tokenizer_files(tmp_path / "tok")
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 16}))
    ours = load_tokenizer(folder)
    short = "a small red circle at the top left on a blue background"  # 14 tokens with start and end
    long = "a small red circle at the top left on a blue background with a thin white border"
    with caplog.at_level(logging.WARNING, logger="muse.text"):
        tokenize(ours, [short])
        assert "text context" not in caplog.text
        ids = tokenize(ours, [short, long])
        assert "1 of 2 prompts are longer than the model's text context of 16 tokens" in caplog.text
        assert repr(long) in caplog.text
        caplog.clear()
        tokenize(ours, [long])
        assert "text context" not in caplog.text  # once per tokenizer
    ref = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert ids.tolist() == ref([short, long], padding="max_length", max_length=16, truncation=True).input_ids


def test_missing_tokenizer_folder_is_rebuilt_offline(published_dirs, tmp_path, reference_pipelines):
    import shutil

    d = tmp_path / "no-tokenizer"
    shutil.copytree(published_dirs("tiny-256"), d, ignore=shutil.ignore_patterns("*.fp16.*", "tokenizer"))
    c = convert.load_components(str(d))
    assert torch.equal(tokens(c.tokenizer), tokens(reference_pipelines("tiny-256").tokenizer))


# --- hub ids ----------------------------------------------------------------------------------------------------


def _hub_cache(root, repo_id: str, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """Arrange `folder` in a hub cache as huggingface_hub lays it out: models--owner--name/snapshots/<rev>, refs/main."""
    import shutil

    repo = root / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


def test_hub_id_loads_from_the_local_cache_offline(published_dirs, tmp_path, monkeypatch, reference_pipelines):
    cache = _hub_cache(tmp_path / "hub", "amused/amused-256", published_dirs("tiny-256"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = convert.load_components("amused/amused-256", variant="fp16", dtype=torch.float16)
    assert c.source == "amused/amused-256" and c.transformer.dtype == torch.float16
    ref = reference_pipelines("tiny-256").transformer
    assert torch.equal(c.transformer.head.logits.weight.flatten(), ref.mlm_layer.conv2.weight.half().flatten())


def test_hub_id_missing_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(convert.CheckpointError) as e:
        convert.load_components("amused/amused-512", variant="fp16")
    msg = str(e.value)
    assert "amused/amused-512: not in the local hub cache" in msg
    assert "hf download amused/amused-512 --include" in msg and "'*/*.fp16.safetensors'" in msg
    assert "huggingface-cli download" in msg
