"""Our LoRA layers: zero-initialised adapters are the identity, merging is exact, and adapters move both ways between
our U-ViT and diffusers' UVit2DModel through peft (same logits, same file keys as diffusers writes)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from convert import uvit_from_diffusers
from convert.lora import (
    CLIP_ALIASES,
    PEFT_WEIGHT_NAME,
    find_targets,
    get_adapters,
    inject_lora,
    load_lora_into,
    module_namer,
    save_lora,
    to_peft_state_dict,
)
from tests.helpers import reference_text_encoder, reference_uvit, uvit_config
from uvit import UViT, UViTConfig
from uvit.lora import LoRALinear, lora_layers, merge_lora, unmerge_lora

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

REFERENCE_TARGETS = ["to_q", "to_k", "to_v"]  # the reference script's --lora_target_modules default
# fp32 on CPU: LoRA adds a rank-r product to each projection; different summation order (merged vs not, ours vs
# peft's) moves logits of magnitude ~5 by a few ulps, far below 1e-4.
ATOL = 1e-4


def tiny_inputs(cfg: UViTConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    side = cfg.sample_size
    ids = torch.randint(0, cfg.vocab_size, (batch, side, side), generator=g)
    hidden = torch.randn(batch, 77, cfg.encoder_hidden_size, generator=g)
    pooled = torch.randn(batch, cfg.cond_embed_dim, generator=g)
    micro = torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]]).repeat(batch, 1)
    return ids, hidden, pooled, micro


def reference_and_ours(kind: str = "tiny-256"):
    """The diffusers UVit2DModel with random weights and our UViT converted from it."""
    ref = reference_uvit(kind)
    ours = uvit_from_diffusers(ref.config, ref.state_dict())
    return ref, ours


def randomize_adapters_(model: nn.Module, seed: int = 3, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=g) * std)


def ref_logits(ref, inputs):
    ids, hidden, pooled, micro = inputs
    with torch.no_grad():
        return ref(ids, encoder_hidden_states=hidden, pooled_text_emb=pooled, micro_conds=micro)


def our_logits(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_zero_initialised_adapters_leave_outputs_unchanged():
    _, ours = reference_and_ours()
    inputs = tiny_inputs(ours.config)
    before = our_logits(ours, inputs)
    names = inject_lora(ours, REFERENCE_TARGETS, rank=4, alpha=8)
    assert names and all(isinstance(ours.get_submodule(n), LoRALinear) for n in names)
    assert all(
        float(layer.lora_a.weight.detach().abs().sum()) > 0 for layer in lora_layers(ours).values()
    )  # A is random
    assert torch.equal(our_logits(ours, inputs), before)  # B = 0: the update is exactly zero


def test_only_adapters_train():
    _, ours = reference_and_ours()
    inject_lora(ours, REFERENCE_TARGETS, rank=4, alpha=8)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a.weight", "lora_b.weight")) for n in trainable)
    # the base model's state-dict keys are unchanged by injection (checkpoints and key maps still apply)
    base_keys = set(UViT(ours.config).state_dict())
    assert base_keys <= set(ours.state_dict())


def test_merged_equals_unmerged_and_unmerge_restores_weights():
    _, ours = reference_and_ours()
    inject_lora(ours, REFERENCE_TARGETS, rank=4, alpha=8)
    randomize_adapters_(ours)
    inputs = tiny_inputs(ours.config)
    base = {n: layer.weight.clone() for n, layer in lora_layers(ours).items()}
    unmerged = our_logits(ours, inputs)
    merge_lora(ours)
    merged = our_logits(ours, inputs)
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=0)
    assert (merged - unmerged).abs().max() < ATOL
    unmerge_lora(ours)
    for n, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.weight, base[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(our_logits(ours, inputs), unmerged, atol=ATOL, rtol=0)


def test_default_targets_are_the_reference_attention_projections():
    """to_q/to_k/to_v (diffusers names) and q/k/v (ours) pick the same layers; for the published 256 layout that is
    22 x 2 transformer attentions + 6 x 2 block attentions, 3 projections each, the modules peft would target in
    diffusers' UVit2DModel."""
    from diffusers import UVit2DModel

    cfg = UViTConfig.amused_256()
    with torch.device("meta"):
        ours = UViT(cfg)
        theirs = UVit2DModel(**cfg.to_diffusers_dict())
    from_reference_names = find_targets(ours, REFERENCE_TARGETS)
    assert from_reference_names == find_targets(ours, ["q", "k", "v"])
    assert len(from_reference_names) == (22 * 2 + 6 * 2) * 3
    namer = module_namer(ours)
    peft_targets = {
        n for n, m in theirs.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in REFERENCE_TARGETS
    }
    assert {namer(n) for n in from_reference_names} == peft_targets


def test_peft_format_loads_into_diffusers_through_peft_with_the_same_logits(tmp_path):
    ref, ours = reference_and_ours()
    inputs = tiny_inputs(ours.config)
    base = ref_logits(ref, inputs)
    inject_lora(ours, REFERENCE_TARGETS, rank=4, alpha=8)  # alpha != rank: the scale must travel with the file
    randomize_adapters_(ours)
    expected = our_logits(ours, inputs)
    assert (expected - base).abs().max() > 0.05  # the adapters matter

    path = save_lora(ours, tmp_path, fmt="peft")
    assert path.name == PEFT_WEIGHT_NAME
    ref.load_lora_adapter(str(tmp_path), prefix="transformer", weight_name=PEFT_WEIGHT_NAME)
    got = ref_logits(ref, inputs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_peft_file_matches_diffusers_lora_saving_key_for_key(tmp_path):
    """The same adapter weights saved by diffusers (peft state dict + AmusedLoraLoaderMixin.save_lora_weights) and by
    us: the same keys, the same tensors."""
    from diffusers.loaders import AmusedLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref, ours = reference_and_ours()
    inject_lora(ours, REFERENCE_TARGETS, rank=4, alpha=8)
    randomize_adapters_(ours)
    save_lora(ours, tmp_path / "ours", fmt="peft")

    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=REFERENCE_TARGETS))
    load_into = {k: v for k, v in _read(tmp_path / "ours" / PEFT_WEIGHT_NAME).items()}
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(ref, {k.removeprefix("transformer."): v for k, v in load_into.items()})
    AmusedLoraLoaderMixin.save_lora_weights(tmp_path / "theirs", transformer_lora_layers=get_peft_model_state_dict(ref))
    ours_file, theirs_file = _read(tmp_path / "ours" / PEFT_WEIGHT_NAME), _read(tmp_path / "theirs" / PEFT_WEIGHT_NAME)
    assert sorted(ours_file) == sorted(theirs_file)
    for k in ours_file:
        assert torch.equal(ours_file[k], theirs_file[k]), k


def test_adapter_saved_by_diffusers_loads_into_ours_with_the_same_logits(tmp_path):
    from peft import LoraConfig

    ref, ours = reference_and_ours()
    inputs = tiny_inputs(ours.config)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=REFERENCE_TARGETS, init_lora_weights=False))
    expected = ref_logits(ref, inputs)
    ref.save_lora_adapter(str(tmp_path))  # unprefixed keys + lora_adapter_metadata (r, lora_alpha, ...)
    names = load_lora_into(ours, tmp_path / PEFT_WEIGHT_NAME)
    assert len(names) == len(find_targets(ours, REFERENCE_TARGETS))
    assert {layer.alpha for layer in lora_layers(ours).values()} == {16.0}
    torch.testing.assert_close(our_logits(ours, inputs), expected, atol=ATOL, rtol=0)


def test_peft_model_folder_loads_into_ours(tmp_path):
    """A PeftModel.save_pretrained folder (what the reference's image-generation script loads with PeftModel)."""
    from peft import LoraConfig, get_peft_model

    ref, ours = reference_and_ours()
    inputs = tiny_inputs(ours.config)
    peft_model = get_peft_model(
        ref, LoraConfig(r=4, lora_alpha=12, target_modules=REFERENCE_TARGETS, init_lora_weights=False)
    )
    expected = ref_logits(peft_model.base_model.model, inputs)
    peft_model.save_pretrained(str(tmp_path))
    load_lora_into(ours, tmp_path)
    assert {layer.alpha for layer in lora_layers(ours).values()} == {12.0}
    torch.testing.assert_close(our_logits(ours, inputs), expected, atol=ATOL, rtol=0)


def test_peft_file_without_alpha_uses_scale_one_as_diffusers(tmp_path):
    """The reference script wrote no alpha; diffusers then loads alpha = rank. We do the same (override: alpha=)."""
    from safetensors.torch import save_file

    ref, ours = reference_and_ours()
    inject_lora(ours, REFERENCE_TARGETS, rank=4, alpha=8)
    randomize_adapters_(ours)
    tensors = _read(save_lora(ours, tmp_path, fmt="peft"))
    save_file(tensors, str(tmp_path / "bare.safetensors"))  # no metadata
    _, fresh = reference_and_ours()
    load_lora_into(fresh, tmp_path / "bare.safetensors")
    assert {layer.alpha for layer in lora_layers(fresh).values()} == {4.0}
    _, fresh2 = reference_and_ours()
    load_lora_into(fresh2, tmp_path / "bare.safetensors", alpha=8)
    inputs = tiny_inputs(ours.config)
    torch.testing.assert_close(our_logits(fresh2, inputs), our_logits(ours, inputs), atol=ATOL, rtol=0)
    ref.load_lora_adapter(str(tmp_path), prefix="transformer", weight_name="bare.safetensors")
    torch.testing.assert_close(ref_logits(ref, inputs), our_logits(fresh, inputs), atol=ATOL, rtol=0)


def test_our_format_round_trip_and_merge_on_load(tmp_path):
    _, ours = reference_and_ours()
    inject_lora(ours, ["q", "v"], rank=3, alpha=5)
    randomize_adapters_(ours)
    inputs = tiny_inputs(ours.config)
    expected = our_logits(ours, inputs)
    path = save_lora(ours, tmp_path / "adapter.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert all(k.startswith("transformer.") and k.endswith((".lora_a.weight", ".lora_b.weight")) for k in keys)
    assert set(json.loads(meta["alphas"]).values()) == {5.0}
    _, fresh = reference_and_ours()
    load_lora_into(fresh, path)
    torch.testing.assert_close(our_logits(fresh, inputs), expected, atol=0, rtol=0)
    _, merged = reference_and_ours()
    load_lora_into(merged, path, merge=True)
    torch.testing.assert_close(our_logits(merged, inputs), expected, atol=ATOL, rtol=0)


def test_text_encoder_lora_uses_clip_projection_names():
    """The reference's to_q/to_k/to_v do not exist in CLIP; we translate them to q_proj/k_proj/v_proj, the modules
    peft targets there, and the peft-format keys match peft's."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    te = reference_text_encoder("tiny-256")
    names = inject_lora(te, REFERENCE_TARGETS, rank=2, alpha=4, aliases=CLIP_ALIASES)
    layers = te.config.num_hidden_layers
    assert len(names) == 3 * layers and all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") for n in names)
    ours, _ = to_peft_state_dict(get_adapters(te), lambda n: n, prefix=None)
    theirs_model = inject_adapter_in_model(
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]), reference_text_encoder("tiny-256")
    )
    assert sorted(ours) == sorted(get_peft_model_state_dict(theirs_model))


def test_bad_targets_and_misfit_adapters_raise_clear_errors(tmp_path):
    _, ours = reference_and_ours()
    with pytest.raises(ValueError, match="no Linear module"):
        inject_lora(ours, ["to_nothing"], rank=4, alpha=4)
    other = UViT(uvit_config("tiny-256"))
    inject_lora(other, ["q"], rank=4, alpha=4)
    save_lora(other, tmp_path / "a.safetensors")
    wide = UViT(UViTConfig.tiny(hidden_size=96, num_attention_heads=4, intermediate_size=128))
    with pytest.raises(ValueError, match="do not fit"):
        load_lora_into(wide, tmp_path / "a.safetensors")
    with pytest.raises(FileNotFoundError):
        load_lora_into(ours, tmp_path / "missing")


def _read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
