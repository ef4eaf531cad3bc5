"""Training data: the reference's preprocessing and micro-conditions, the three sources, unreadable images skipped and
counted, a sampler that shards and resumes exactly, and the pre-encoded cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from train.config import TrainConfig
from train.data import (
    GlobalBatchSampler,
    HFDatasetSource,
    ImageDataset,
    ImageFolderSource,
    PreEncodedDataset,
    SingleImageSource,
    build_source,
    collate,
    has_one_crop,
    image_size,
    open_image,
    pre_encode,
    resize_and_crop,
    sample_generator,
)


def write_image(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    write_image(d / "a red cube.png", 40, 64, 0)
    write_image(d / "a blue ball.jpg", 48, 32, 1)
    write_image(d / "green grass.png", 32, 32, 2)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # a PNG header and nothing else
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.mark.parametrize("w, h", [(32, 32), (64, 64), (24, 24), (32, 33), (40, 64), (48, 32), (1000, 999)])
def test_single_crop_is_predicted_from_the_header_as_resize_and_crop_draws_it(tmp_path, w, h):
    """`image_size` reads (width, height) without decoding, from every input `open_image` takes; `has_one_crop`
    says True exactly when 20 differently seeded crops of the image are all the same pixels."""
    path = write_image(tmp_path / "x.png", w, h)
    data = path.read_bytes()
    for source in (path, str(path), data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}):
        assert image_size(source) == (w, h)
    image = open_image(path)
    assert image_size(image) == (w, h)
    crops = [resize_and_crop(image, 32, torch.Generator().manual_seed(s)) for s in range(20)]
    same = all(torch.equal(c[0], crops[0][0]) and torch.equal(c[1], crops[0][1]) for c in crops)
    assert has_one_crop(w, h, 32) == same


def test_source_sizes_come_from_headers(folder):
    source = ImageFolderSource(folder)
    sizes = {
        source.name(i).rsplit("/", 1)[-1]: source.size(i) for i in range(len(source)) if "broken" not in source.name(i)
    }
    assert sizes == {"a red cube.png": (40, 64), "a blue ball.jpg": (48, 32), "green grass.png": (32, 32)}
    broken = next(i for i in range(len(source)) if "broken" in source.name(i))
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError
        source.size(broken)


def test_preprocessing_is_the_reference_resize_crop_and_micro_conditions():
    """Shorter side -> 32 (bilinear), random 32x32 crop, [0, 1] pixels; micro-conditions = [original width,
    original height, crop top, crop left, 6]."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8))  # width 40, height 64
    pixels, micro = resize_and_crop(image, 32, torch.Generator().manual_seed(7))
    w, h, top, left, score = micro.tolist()
    assert (w, h, score) == (40, 64, 6.0) and left == 0 and 0 <= top <= 51 - 32
    resized = np.asarray(image.resize((32, 51), Image.BILINEAR), dtype=np.float32) / 255
    expected = torch.from_numpy(resized[int(top) : int(top) + 32]).permute(2, 0, 1)
    assert pixels.shape == (3, 32, 32) and torch.equal(pixels, expected)
    crops = {resize_and_crop(image, 32, torch.Generator().manual_seed(s))[1][2].item() for s in range(40)}
    assert len(crops) > 5  # the crop really is random


def test_folder_prompts_are_file_stems_or_metadata_captions(folder):
    src = ImageFolderSource(folder)
    assert len(src) == 4  # images only (the .txt is ignored); the broken one is found when read
    assert sorted(src.prompt(i) for i in range(len(src))) == ["a blue ball", "a red cube", "broken", "green grass"]
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "green grass.png", "text": "a lawn"}) + "\n")
    src = ImageFolderSource(folder)
    assert "a lawn" in {src.prompt(i) for i in range(len(src))}


def test_unreadable_image_is_skipped_and_counted(folder):
    ds = ImageDataset(ImageFolderSource(folder), resolution=32, seed=0)
    broken = [i for i in range(len(ds)) if ds.source.name(i).endswith("broken.png")][0]
    item = ds[(broken, 0)]  # the next readable image takes its place
    assert item["skipped"] == [str(folder / "broken.png")] and item["pixels"].shape == (3, 32, 32)
    sampler = GlobalBatchSampler(len(ds), batch=2, seed=0)
    it = iter(sampler)
    skipped = []
    for _ in range(4):  # two epochs of four examples
        batch = collate([ds[k] for k in next(it)])
        assert batch["pixels"].shape == (2, 3, 32, 32)
        skipped += batch["skipped"]
    assert skipped == [str(folder / "broken.png")] * 2  # met once per epoch, counted each time


def test_no_readable_image_is_a_clear_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.png").write_bytes(b"nope")
    ds = ImageDataset(ImageFolderSource(d), 32, 0)
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        ds[(0, 0)]


def test_single_image_source_repeats_one_image_with_fresh_crops(folder):
    ds = ImageDataset(SingleImageSource(folder / "a red cube.png"), 32, seed=0)
    items = [ds[k] for k in next(iter(GlobalBatchSampler(len(ds), batch=8, seed=0)))]
    assert {it["prompt"] for it in items} == {"a red cube"}
    assert len({float(it["micro_conds"][2]) for it in items}) > 1  # different crops of the same image


def test_hf_dataset_from_local_path_with_prefix_and_a_broken_row(tmp_path, folder):
    import datasets

    good = (folder / "a red cube.png").read_bytes()
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": b"garbage", "path": None}], "text": ["cube", "nothing"]}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    cfg = TrainConfig(
        instance_data_dataset=str(tmp_path / "hf"), image_key="image", prompt_key="text", prompt_prefix="minecraft "
    )
    src = build_source(cfg)
    assert isinstance(src, HFDatasetSource) and len(src) == 2
    assert src.prompt(0) == "minecraft cube"
    item = ImageDataset(src, 32, 0)[(1, 0)]
    assert item["skipped"] == [f"{tmp_path / 'hf'}[1]"] and item["prompt"] == "minecraft cube"
    with pytest.raises(ValueError, match="no column"):
        HFDatasetSource(str(tmp_path / "hf"), "img", "text")


def test_exactly_one_source_is_required(folder):
    with pytest.raises(ValueError, match="exactly one"):
        build_source(TrainConfig(instance_data_dir=str(folder), instance_data_image=str(folder / "a red cube.png")))
    with pytest.raises(ValueError, match="exactly one"):
        build_source(TrainConfig())


def test_sampler_shards_the_global_batch_and_resumes_exactly():
    n, batch, world = 7, 2, 3
    whole = iter(GlobalBatchSampler(n, batch * world, seed=1))
    ranks = [iter(GlobalBatchSampler(n, batch, seed=1, rank=r, world=world)) for r in range(world)]
    stream = []
    for _ in range(5):
        g = next(whole)
        assert sum((next(r) for r in ranks), []) == g  # the processes' rows make up the global batch
        stream += g
    positions = [p for _, p in stream]
    assert positions == list(range(len(stream)))
    for e in range(len(stream) // n):  # each epoch visits every example once
        assert sorted(i for i, _ in stream[e * n : (e + 1) * n]) == list(range(n))
    resumed = iter(GlobalBatchSampler(n, batch * world, seed=1, start=3))
    assert next(resumed) == stream[3 * batch * world : 4 * batch * world]


@pytest.mark.slow
def test_pre_encoded_cache_holds_what_the_models_compute(tmp_path, folder):
    from convert.clip_tokenizer import offline_clip_tokenizer
    from muse.text import encode_text
    from tests.helpers import randomize_, reference_text_encoder
    from vqgan import VQGAN, VQGANConfig

    vq = randomize_(VQGAN(VQGANConfig.tiny()), 1).eval()
    te, tok = reference_text_encoder("tiny-256"), offline_clip_tokenizer()

    def encode(prompts):
        c = encode_text(tok, te, prompts)
        return c.encoder_hidden_states, c.prompt_embeds

    ds = ImageDataset(ImageFolderSource(folder), 32, seed=3)
    pre_encode(
        ds, tmp_path / "cache", vq, encode, fingerprint="x", batch_size=2, store_dtype=torch.float32, progress=False
    )
    cache = PreEncodedDataset(tmp_path / "cache")
    assert len(cache) == 3  # the broken image is left out
    readable = [i for i in range(len(ds)) if not ds.source.name(i).endswith("broken.png")]
    for row, i in enumerate(readable):
        item = ds.read(i, sample_generator(3, i))
        got = cache[(row, 0)]
        assert torch.equal(got["ids"], vq.encode(item["pixels"][None])[0])
        hidden, pooled = encode([item["prompt"]])
        # the cache encoded prompts two at a time, here one: batched fp32 matmuls differ by a few ulps
        torch.testing.assert_close(got["encoder_hidden_states"], hidden[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["prompt_embeds"], pooled[0], atol=1e-5, rtol=0)
        assert torch.equal(got["micro_conds"], item["micro_conds"])
    empty_hidden, empty_pooled = encode([""])
    assert torch.equal(cache.empty_hidden, empty_hidden[0]) and torch.equal(cache.empty_pooled, empty_pooled[0])
