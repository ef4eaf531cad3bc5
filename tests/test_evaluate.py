"""The evaluation command: prompt sets, the resumable sweep, CLIP score, FID and the files it writes.

Metric networks have random weights built offline from the libraries' own architectures: open_clip's "ViT-S-32"
config and torch-fidelity's `FeatureExtractorInceptionV3`, saved to local files and loaded back through the same
local-weights paths a user's real weights take. Generation is a counting fake in the sweep tests and the real
`muse.Pipeline` in the end-to-end test.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from muse.cli import main as muse_main
from muse.evaluation import (
    ClipScorer,
    InceptionFID,
    MissingWeightsError,
    Setting,
    clip_score_from_embeddings,
    evaluate,
    expand_grid,
    feature_statistics,
    frechet_distance,
    image_seed,
    load_prompts,
    run_sweep,
)

CLIP_MODEL = "ViT-S-32"  # the smallest plain CLIP config open_clip ships (63M parameters, text width = embed dim)


# --- fixtures: metric networks with random weights, saved as a user's weights would be ---------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, as a local .pth state dict.

    The class loads weights in its constructor; a subclass whose load_state_dict keeps the random init gives the
    exact architecture. Default conv init shrinks activations ~1e-8 by pool3; Kaiming-normal init keeps them O(1)
    so FID differences are well above float round-off."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    d = tmp_path_factory.mktemp("inception")
    torch.save({}, d / "empty.pth")
    torch.manual_seed(0)
    net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(d / "empty.pth"))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = d / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fid_metric(inception_weights):
    return InceptionFID(inception_weights, batch_size=16, offline=True)


def _random_clip():
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(CLIP_MODEL)


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """A random ViT-S-32 saved as a local open_clip checkpoint (safetensors)."""
    from safetensors.torch import save_file

    model, _, _ = _random_clip()
    path = tmp_path_factory.mktemp("clip") / "random-vit-s-32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _pictures(n: int, size=(32, 32), seed: int = 0) -> list[PIL.Image.Image]:
    """Smooth random pictures: 4x4 random colours upsampled bilinearly."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    hi = torch.nn.functional.interpolate(low, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    arr = (hi.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return [PIL.Image.fromarray(a) for a in arr]


class CountingGenerator:
    """A fake generate(setting, prompts, seeds): a picture determined by (seed, guidance scale); counts its calls."""

    def __init__(self):
        self.calls = 0
        self.images = 0
        self.seen: list[tuple[str, int]] = []

    def __call__(self, setting: Setting, prompts: list[str], seeds: list[int]):
        self.calls += 1
        self.images += len(prompts)
        self.seen += list(zip(prompts, seeds))
        return [_pictures(1, seed=s + int(setting.guidance_scale * 1000))[0] for s in seeds]


# --- prompts ---------------------------------------------------------------------------------------------------------

PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
]


@pytest.mark.parametrize(
    "kind", ["txt", "json-list", "json-records", "jsonl", "csv", pytest.param("saved-dataset", marks=pytest.mark.slow)]
)
def test_prompts_load_from_every_format(tmp_path, kind):
    if kind == "txt":
        src = tmp_path / "p.txt"
        src.write_text("\n".join(PROMPTS) + "\n\n")
    elif kind == "json-list":
        src = tmp_path / "p.json"
        src.write_text(json.dumps(PROMPTS))
    elif kind == "json-records":
        src = tmp_path / "p.json"
        src.write_text(json.dumps([{"id": i, "caption": p} for i, p in enumerate(PROMPTS)]))
    elif kind == "jsonl":
        src = tmp_path / "p.jsonl"
        src.write_text("\n".join(json.dumps({"text": p}) for p in PROMPTS))
    elif kind == "csv":
        src = tmp_path / "p.csv"
        with src.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            w.writerows([[f"{i}.png", p] for i, p in enumerate(PROMPTS)])
    else:
        import datasets

        src = tmp_path / "ds"
        datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"sentences": PROMPTS})}).save_to_disk(str(src))
        assert load_prompts(src, column="sentences", split="validation") == PROMPTS
        return
    assert load_prompts(src) == PROMPTS
    assert load_prompts(src, limit=2) == PROMPTS[:2]


def test_prompts_bad_column_is_named(tmp_path):
    src = tmp_path / "p.csv"
    src.write_text("image,label\n0.png,cat\n")
    with pytest.raises(ValueError, match="no column named one of"):
        load_prompts(src)
    with pytest.raises(ValueError, match="no column 'caption'"):
        load_prompts(src, column="caption")


# --- the sweep -------------------------------------------------------------------------------------------------------


def test_grid_is_every_combination_with_models_outermost():
    settings = expand_grid(guidance_scales=[1, 4], num_inference_steps=[8, 12], checkpoints=["a", "b"])
    assert len(settings) == 8 and len(set(settings)) == 8
    assert [s.checkpoint for s in settings] == ["a"] * 4 + ["b"] * 4  # each model loaded once
    assert len({s.key() for s in settings}) == 8
    assert settings[0].key({"dtype": "float16"}) != settings[0].key({"dtype": "float32"})
    with pytest.raises(ValueError, match="repeats"):
        expand_grid(guidance_scales=[4, 4])


def test_sweep_resumes_without_regenerating(tmp_path):
    settings = expand_grid(guidance_scales=[1.0, 4.0])
    gen = CountingGenerator()
    first = run_sweep(gen, settings, PROMPTS, [0, 1], tmp_path, batch_size=4, progress=False)
    assert gen.images == 2 * 3 * 2 and gen.calls == 2 * math.ceil(6 / 4)
    assert [r.generated for r in first] == [6, 6]

    again = CountingGenerator()
    second = run_sweep(again, settings, PROMPTS, [0, 1], tmp_path, batch_size=4, progress=False)
    assert again.calls == 0
    assert [r.generated for r in second] == [0, 0]
    assert [r.records for r in second] == [r.records for r in first]  # same files, same recorded times

    # a new seed and a changed prompt: only those images are made
    more = CountingGenerator()
    changed = [PROMPTS[0], "a purple circle on an orange background", PROMPTS[2]]
    run_sweep(more, settings, changed, [0, 1, 2], tmp_path, batch_size=4, progress=False)
    expected = {(changed[i], image_seed(s, i)) for s in (0, 1, 2) for i in range(3) if s == 2 or i == 1}
    assert more.images == 2 * len(expected) and set(more.seen) == expected


def test_sweep_seeds_are_per_image_whatever_the_batch(tmp_path):
    settings = [Setting(guidance_scale=4.0)]
    by_batch = {}
    for batch_size in (1, 5):
        gen = CountingGenerator()
        run_sweep(gen, settings, PROMPTS, [0, 3], tmp_path / str(batch_size), batch_size=batch_size, progress=False)
        by_batch[batch_size] = sorted(gen.seen)
    assert by_batch[1] == by_batch[5]
    assert sorted(s for _, s in by_batch[1]) == sorted(image_seed(s, i) for s in (0, 3) for i in range(3))
    assert len({s for _, s in by_batch[1]}) == 6  # every image its own random stream


# --- CLIP score ------------------------------------------------------------------------------------------------------


def test_clip_score_is_100_times_cosine_clipped_at_zero():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    text = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 3.0]])
    scores = clip_score_from_embeddings(image, text)
    torch.testing.assert_close(scores, torch.tensor([100 / math.sqrt(2), 0.0, 0.0]))


@pytest.mark.slow
def test_clip_score_prefers_the_matching_caption(tmp_path):
    """Constructed case: a random ViT-S-32 whose text projection P is chosen so that caption A's pooled text
    feature t_A maps onto the image's embedding e and caption B's onto -e. P is the minimum-norm solution of
    [t_A; t_B] P = [e; -e] (two linear constraints on a 384x384 matrix, exactly solvable when t_A, t_B are linearly
    independent). So by design cos(image, A) = 1 and cos(image, B) = -1: CLIP score 100 and, clipped, 0. The model is
    saved and scored through ClipScorer's local-file loading and its own preprocessing and tokenizer."""
    from safetensors.torch import save_file

    model, preprocess, tokenizer = _random_clip()
    image = _pictures(1, size=(64, 64), seed=3)[0]
    captions = ["a red circle on a blue background", "a green square on a white background"]
    with torch.no_grad():
        e = model.encode_image(preprocess(image).unsqueeze(0))[0]  # (384,)
        model.text_projection.copy_(torch.eye(model.text_projection.shape[0]))  # encode_text -> pooled features
        t = model.encode_text(tokenizer(captions))  # (2, 384)
        target = torch.stack([e, -e])
        model.text_projection.copy_((torch.linalg.pinv(t.double()) @ target.double()).float())
    path = tmp_path / "constructed.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)

    scorer = ClipScorer(CLIP_MODEL, str(path), offline=True)
    scores = scorer.scores([image, image], captions)
    assert scores[0] > 99.9  # cosine 1 up to float32 round-off
    assert scores[1] == 0.0  # cosine -1, clipped
    assert scorer.describe()["weights"] == str(path)


# --- FID -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(fid_metric, tmp_path):
    """The reference set is read from a folder (the command's path); the generated sets are the same images with
    Gaussian pixel noise of growing strength (one fixed noise pattern, scaled)."""
    images = _pictures(4, size=(32, 32), seed=1)
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.png")
    reference, n = fid_metric.reference_statistics(tmp_path, (32, 32))
    assert n == 4
    noise = torch.randn(4, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).float()
    fids = []
    for sigma in (0, 12, 48):
        noisy = (pixels + sigma * noise).round().clamp(0, 255).to(torch.uint8).numpy()
        fids.append(
            frechet_distance(
                feature_statistics(fid_metric.features([PIL.Image.fromarray(a) for a in noisy])), reference
            )
        )
    scale = float(np.trace(reference["sigma"]))  # the size of a typical FID between unrelated sets
    # ~0: a zero eigenvalue's float64 round-off (1e-16 of the largest) becomes 1e-8 relative after the square root
    assert abs(fids[0]) < 1e-6 * scale, fids
    assert fids[1] > 1e-3 * scale and fids[1] < fids[2], fids


@pytest.mark.parametrize("n", [40, 600], ids=["fewer-images-than-dims", "more-images-than-dims"])
def test_frechet_distance_equals_torch_fidelitys(n):
    """Our symmetric route against torch-fidelity's own formula (eigenvalues of the non-symmetric product) on the same
    statistics; D = 256 keeps the reference computation fast. Tolerance 1e-6 relative: with fewer images than
    dimensions the product has D - N zero eigenvalues, and the square roots of their round-off (each ~1e-8 of the
    largest) add up in the reference's trace; with more images both agree to 1e-8."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    g = torch.Generator().manual_seed(n)
    mix = torch.randn(256, 256, generator=g) / 16
    a = feature_statistics(torch.randn(n, 256, generator=g) @ mix)
    b = feature_statistics(
        (torch.randn(n + 7, 256, generator=g) + 0.3) @ (mix + 0.05 * torch.randn(256, 256, generator=g))
    )
    theirs = fid_statistics_to_metric({"mu": a["mu"], "sigma": a["sigma"]}, {"mu": b["mu"], "sigma": b["sigma"]}, False)
    tolerance = 1e-6 if n < 256 else 1e-8
    assert frechet_distance(a, b) == pytest.approx(theirs[KEY_METRIC_FID], rel=tolerance)
    assert frechet_distance(b, a) == pytest.approx(theirs[KEY_METRIC_FID], rel=tolerance)
    if n < 256:  # a third route, exact for low rank: tr sqrt(S_a S_b) = the sum of singular values of X_a X_b^T
        xa, xb = a["centered"], b["centered"]
        tr_sqrt = np.linalg.svd(xa @ xb.T / math.sqrt((a["n"] - 1) * (b["n"] - 1)), compute_uv=False).sum()
        diff = a["mu"] - b["mu"]
        exact = diff @ diff + np.trace(a["sigma"]) + np.trace(b["sigma"]) - 2 * tr_sqrt
        assert frechet_distance(a, b) == pytest.approx(exact, rel=1e-9)  # squaring in X S_b X^T costs a few digits


def test_fid_refuses_a_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc": "not a tensor"}, path)
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        InceptionFID(path)


# --- missing weights -------------------------------------------------------------------------------------------------


def test_missing_clip_weights_name_what_to_supply():
    with pytest.raises(MissingWeightsError, match="--clip-weights PATH"):
        ClipScorer(CLIP_MODEL, None)
    with pytest.raises(MissingWeightsError, match="timm/vit_base_patch32_clip_224.openai"):
        ClipScorer("ViT-B-32", "openai", offline=True)  # the file of the tag, named with its repo


def test_missing_fid_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth.*--fid-weights"):
        InceptionFID(None, offline=True)


def test_command_stops_before_generating_when_weights_are_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    ref = tmp_path / "ref"
    ref.mkdir()
    _pictures(1)[0].save(ref / "0.png")
    code = muse_main(
        [
            "evaluate",
            "--prompts",
            str(prompts),
            "--out",
            str(tmp_path / "out"),
            "--fid-reference",
            str(ref),
            "--offline",
        ]
    )
    assert code == 2
    assert "weights-inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- the reports -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_writes_table_plot_and_grids(tmp_path, clip_weights, fid_metric):
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, im in enumerate(_pictures(2, size=(48, 40), seed=9)):  # another size and aspect: fitted to 32x32
        im.save(ref / f"{i}.png")
    settings = expand_grid(guidance_scales=[1.0, 4.0])
    out = tmp_path / "out"
    clip = ClipScorer(CLIP_MODEL, str(clip_weights), offline=True)
    rows = evaluate(
        CountingGenerator(),
        settings,
        PROMPTS[:2],
        [0],
        out,
        batch_size=3,
        clip=clip,
        fid=fid_metric,
        fid_reference=ref,
        progress=False,
    )

    assert len(rows) == 2
    for row in rows:
        assert row["num_images"] == 2 and row["seconds_per_image"] > 0
        assert 0 <= row["clip_score"] <= 100 and row["fid"] > 0
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["label"] for r in table] == [r["label"] for r in rows]
    assert float(table[0]["fid"]) == pytest.approx(rows[0]["fid"])
    info = json.loads((out / "results.json").read_text())["info"]
    assert "torch-fidelity" in info["metrics"]["fid"]["implementation"]
    assert "bilinear" in info["metrics"]["fid"]["resizing"]
    assert info["metrics"]["fid"]["num_reference_images"] == {"32x32": 2}
    assert info["metrics"]["clip_score"]["model"] == CLIP_MODEL
    with PIL.Image.open(out / "results_plot.png") as plot:
        assert plot.size[0] > 400
    grids = sorted((out / "grids").glob("*.png"))
    assert len(grids) == 2
    with PIL.Image.open(grids[0]) as g:
        assert g.size == (2 * 32, 32)  # a column per prompt, a row per seed


def test_metrics_not_requested_are_absent_not_zero(tmp_path):
    rows = evaluate(CountingGenerator(), [Setting()], PROMPTS, [0], tmp_path, progress=False)
    assert rows[0]["clip_score"] is None and rows[0]["fid"] is None
    table = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert table[0]["clip_score"] == "" and table[0]["fid"] == ""
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"][0]["fid"] is None
    assert data["info"]["metrics"]["fid"]["computed"] is False
    assert (tmp_path / "results_plot.png").is_file()


# --- end to end: the command on real models --------------------------------------------------------------------------


def _run_command(tmp_path, model, prompts, references, clip_weights, inception_weights, extra=()):
    """`python -m muse evaluate` (the muse CLI's entry point) with random-weight metric networks."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts))
    ref = tmp_path / "ref"
    ref.mkdir(exist_ok=True)
    for i, im in enumerate(references):
        im.save(ref / f"{i}.png")
    out = tmp_path / "out"
    args = [
        "evaluate",
        "--prompts",
        str(prompt_file),
        "--out",
        str(out),
        "--model",
        str(model),
        "--device",
        "cpu",
        "--guidance-scales",
        "1",
        "4",
        "--seeds",
        "0",
        "--batch-size",
        "2",
        "--clip-model",
        CLIP_MODEL,
        "--clip-weights",
        str(clip_weights),
        "--fid-reference",
        str(ref),
        "--fid-weights",
        str(inception_weights),
        *extra,
    ]
    assert muse_main(args) == 0
    return out, args


def _check_results(out, num_settings, num_images):
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == num_settings
    for row in rows:
        assert row["num_images"] == num_images and row["seconds_per_image"] > 0
        assert 0 <= row["clip_score"] <= 100 and row["fid"] > 0
    assert (out / "results.csv").is_file() and (out / "results_plot.png").is_file()
    assert len(list((out / "grids").glob("*.png"))) == num_settings
    return rows


@pytest.mark.slow
def test_command_end_to_end_on_a_tiny_model_resumes(tmp_path, published_dirs, clip_weights, inception_weights):
    """A random tiny aMUSEd (32x32 images) in the published layout: generate, score, write; run again: nothing is
    generated again and the numbers are the same."""
    out, args = _run_command(
        tmp_path,
        published_dirs("tiny-256"),
        PROMPTS[:2],
        _pictures(3, size=(32, 32), seed=5),
        clip_weights,
        inception_weights,
        extra=["--steps", "4"],
    )
    first = _check_results(out, num_settings=2, num_images=2)
    assert [r["generated_now"] for r in first] == [2, 2]
    with PIL.Image.open(out / "images" / first[0]["key"] / "p000000_s0.png") as im:
        assert im.size == (32, 32)
    assert muse_main(args) == 0
    second = _check_results(out, num_settings=2, num_images=2)
    assert [r["generated_now"] for r in second] == [0, 0]
    assert [(r["clip_score"], r["fid"]) for r in second] == [(r["clip_score"], r["fid"]) for r in first]


@pytest.mark.slow
def test_command_end_to_end_on_the_embedded_default_model(tmp_path, clip_weights, inception_weights):
    """The shipped default model (64x64 synthetic shapes) on a handful of captions of its domain; FID against shapes
    rendered by muse.shapes."""
    from muse import DEFAULT_MODEL_DIR

    if not DEFAULT_MODEL_DIR.is_dir() or not any(DEFAULT_MODEL_DIR.iterdir()):
        pytest.skip(f"the embedded default model is not in {DEFAULT_MODEL_DIR} yet")
    from muse import shapes

    prompts = shapes.captions(shapes.sample_scenes(3, seed=0))
    pixels = shapes.render(shapes.sample_scenes(4, seed=1))  # (4, 3, 64, 64) in [0, 1]
    references = [PIL.Image.fromarray(a) for a in (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()]
    out, _ = _run_command(tmp_path, DEFAULT_MODEL_DIR, prompts, references, clip_weights, inception_weights)
    rows = _check_results(out, num_settings=2, num_images=3)
    with PIL.Image.open(out / "images" / rows[0]["key"] / "p000000_s0.png") as im:
        assert im.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
