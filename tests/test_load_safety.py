"""Loading never runs code from a checkpoint, and every broken input is a clear error naming its file."""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil

import pytest
import torch

import convert
from convert.safe_load import CheckpointError, read_pickled_weights, read_safetensors


class _WritesMarker:
    """Unpickling this object calls Path.write_text(marker, ...): code execution, as in a malicious checkpoint."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "unpickled: code ran")


def _armed_pickle(path: pathlib.Path, marker: pathlib.Path, zip_format: bool) -> pathlib.Path:
    payload = {"encoder_proj.weight": torch.zeros(2, 2), "payload": _WritesMarker(marker)}
    if zip_format:
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save", "plain-pickle"])
def test_code_running_pickle_is_refused_without_running(zip_format, tmp_path):
    # the same construction really does run code when unpickled without restrictions
    probe_marker = tmp_path / "probe-ran"
    probe = _armed_pickle(tmp_path / "probe.bin", probe_marker, zip_format)
    if zip_format:
        torch.load(probe, weights_only=False)
    else:
        pickle.loads(probe.read_bytes())
    assert probe_marker.exists()

    marker = tmp_path / "marker"
    bad = _armed_pickle(tmp_path / "pytorch_model.bin", marker, zip_format)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to load"):
        read_pickled_weights(bad)
    assert not marker.exists()


def test_code_running_pickle_in_an_open_muse_folder_is_refused(tmp_path):
    folder = tmp_path / "om"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "MaskGiTUViT_v2"}))
    marker = tmp_path / "marker"
    _armed_pickle(folder / "transformer" / "pytorch_model.bin", marker, zip_format=True)
    with pytest.raises(CheckpointError, match=r"transformer/pytorch_model\.bin: refused to load"):
        convert.load_components(str(folder))
    assert not marker.exists()


def test_weights_only_pickle_of_tensors_loads(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "b.bias": torch.arange(4)}
    torch.save(sd, tmp_path / "ok.bin")
    out = read_pickled_weights(tmp_path / "ok.bin")
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


# --- broken published folders -----------------------------------------------------------------------------------


@pytest.fixture
def folder(published_dirs, tmp_path):
    """A private copy of the tiny published folder (fp32 files only) to break."""
    dst = tmp_path / "pipe"
    shutil.copytree(published_dirs("tiny-256"), dst, ignore=shutil.ignore_patterns("*.fp16.*"))
    return dst


def test_truncated_safetensors_names_the_file(folder):
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"{weights}: truncated safetensors file"):
        convert.load_components(str(folder))


def test_corrupt_safetensors_header_names_the_file(folder):
    weights = folder / "vqvae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header...\xff"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{weights}: corrupt safetensors file"):
        convert.load_components(str(folder))


def test_empty_weights_file_names_the_file(folder):
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{weights}: not a safetensors file"):
        convert.load_components(str(folder))


def test_safetensors_reader_maps_a_good_file(folder):
    tensors = read_safetensors(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    assert len(tensors) > 10 and all(t.device.type == "cpu" for t in tensors.values())


@pytest.mark.parametrize("component", ["transformer", "vqvae", "text_encoder"])
def test_missing_component_folder_is_named(folder, component):
    shutil.rmtree(folder / component)
    with pytest.raises(CheckpointError, match=rf"the {component}/ component folder is missing"):
        convert.load_components(str(folder))


def test_missing_weights_file_is_named(folder):
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"transformer: no weights file \(looked for diffusion_pytorch_model\.safetensors"
    ):
        convert.load_components(str(folder))


def test_missing_variant_says_which_files_exist(folder):
    with pytest.raises(
        CheckpointError,
        match=r"no weights file .* it holds \['diffusion_pytorch_model\.safetensors'\]: load without the 'fp16' variant",
    ):
        convert.load_components(str(folder), variant="fp16")


def test_config_that_does_not_match_its_weights(folder):
    cfg_path = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] += 1
    cfg_path.write_text(json.dumps(cfg))
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(
        CheckpointError,
        match=rf"{weights}: does not match {cfg_path}: .*missing \d+ tensor\(s\): transformer_layers\.2\.",
    ):
        convert.load_components(str(folder))


def test_config_with_wrong_width_reports_shapes(folder):
    cfg_path = folder / "vqvae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["latent_channels"] *= 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"vqvae/diffusion_pytorch_model\.safetensors: does not match .*misshapen"
    ):
        convert.load_components(str(folder))


def test_text_encoder_config_that_does_not_match_its_weights(folder):
    cfg_path = folder / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"text_encoder/model\.safetensors does not fit CLIPTextModelWithProjection: missing"
    ):
        convert.load_components(str(folder))


def test_invalid_json_config_names_the_file(folder):
    cfg_path = folder / "transformer" / "config.json"
    cfg_path.write_text("{ not json")
    with pytest.raises(CheckpointError, match=rf"{cfg_path}: U-ViT config file is not valid JSON"):
        convert.load_components(str(folder))


def test_wrong_class_in_config_is_named(folder):
    cfg_path = folder / "vqvae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "AutoencoderKL"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"{cfg_path}: config is for a AutoencoderKL, expected VQModel"):
        convert.load_components(str(folder))


def test_unknown_folder_says_what_was_expected(tmp_path):
    (tmp_path / "random.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder this loader knows: expected model_index\.json"):
        convert.load_components(str(tmp_path))


def test_missing_path_that_is_not_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder, and not a hub id"):
        convert.load_components(str(tmp_path / "nowhere" / "deeper"))


def test_non_float_dtype_is_refused(folder):
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype"):
        convert.load_components(str(folder), dtype=torch.int8)
