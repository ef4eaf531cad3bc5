"""The settings grid and the resumable generation sweep.

A `Setting` is one point of the grid (guidance scale, steps, temperature, schedules, checkpoint, LoRA adapter,
sampler, guidance interval). The sweep asks a `generate(setting, prompts, seeds) -> images` function for every
(prompt, seed) of every setting, in batches, and saves each image as

    <out>/images/<setting key>/p<prompt index>_s<seed>.png

with a line in <out>/manifest.json (prompt, seed, seconds per image). A second run with the same arguments finds the
images in the manifest and on disk and does not generate them again; a changed prompt at the same index is
regenerated. The setting key is a hash of the setting and of the run's context (dtype, device), so a different
setting never reuses another's images; the sampler and the guidance interval enter the hash only when set, so a
setting without them has the key it had before they existed.

Seeds are reproducible per image: image (prompt i, seed s) is drawn with a generator seeded with
`image_seed(s, i) = s * SEED_STRIDE + i`, independent of the batch size and of the other prompts, and the same for
every setting (so settings are compared on the same random streams).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import PIL.Image
from tqdm.auto import tqdm

from sampling import Sampler, check_interval

from ..arguments import parse_sampler, sampler_text

SEED_STRIDE = 1_000_000  # prompts per seed block; image_seed(s, i) = s * SEED_STRIDE + i
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
LATER_OPTIONS = ("sampler", "guidance_interval")  # Setting fields hashed into the key only when not None


@dataclass(frozen=True)
class Setting:
    """One point of the sweep. None means "the model's own default" (or, for lora, no adapter)."""

    guidance_scale: float = 10.0
    num_inference_steps: int = 12
    temperature: tuple[float, float] = (2.0, 0.0)  # re-masking temperature, annealed linearly from start to end
    masking_schedule: str | None = None  # 'cosine', 'linear', 'arccos', 'power:<p>'; None: the model's (cosine)
    guidance_schedule: str = "constant"  # 'constant' (the reference), 'linear', 'cosine', 'power-cosine[:p]'
    checkpoint: str | None = None  # a model folder or hub id; None: the generator's default model
    lora: str | None = None  # a LoRA adapter file loaded on top of the checkpoint
    sampler: str | None = None  # 'NAME[:key=value,...]' in canonical form (arguments.sampler_text); None: the model's
    guidance_interval: tuple[int, int] | None = None  # guide only the 0-based steps start <= i < end; None: every step

    def __post_init__(self):
        """The sampler in canonical text; the guidance interval and the sampler's step window fit the steps."""
        if self.sampler is not None:
            sampler = parse_sampler(self.sampler) if isinstance(self.sampler, str) else self.sampler
            sampler.check(self.num_inference_steps)
            object.__setattr__(self, "sampler", sampler_text(sampler))
        if self.guidance_interval is not None:
            interval = check_interval(tuple(self.guidance_interval), "guidance interval", self.num_inference_steps)
            object.__setattr__(self, "guidance_interval", interval)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["temperature"] = list(self.temperature)
        d["guidance_interval"] = None if self.guidance_interval is None else list(self.guidance_interval)
        return d

    def key(self, context: dict | None = None) -> str:
        """12 hex digits identifying the images of this setting under `context` (dtype, device, ...). The options
        added later (sampler, guidance_interval) enter the hash only when set, so the settings of earlier runs keep
        their keys and their images are found again."""
        setting = self.as_dict()
        for name in LATER_OPTIONS:
            if setting[name] is None:
                del setting[name]
        blob = json.dumps({"setting": setting, "context": context or {}}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def label(self) -> str:
        """A short readable name: 'cfg10_steps12_temp2-0' plus whatever differs from the defaults."""
        parts = [
            f"cfg{_num(self.guidance_scale)}",
            f"steps{self.num_inference_steps}",
            f"temp{_num(self.temperature[0])}-{_num(self.temperature[1])}",
        ]
        if self.masking_schedule:
            parts.append(f"mask-{self.masking_schedule}")
        if self.guidance_schedule != "constant":
            parts.append(f"cfgsched-{self.guidance_schedule}")
        if self.checkpoint:
            parts.append(f"ckpt-{Path(self.checkpoint).name or self.checkpoint}")
        if self.lora:
            parts.append(f"lora-{Path(self.lora).stem}")
        if self.sampler is not None:
            parts.append("sampler-" + self.sampler.replace(":", "-").replace("=", "").replace(",", "-"))
        if self.guidance_interval is not None:
            parts.append(f"gi{self.guidance_interval[0]}-{self.guidance_interval[1]}")
        return "_".join(p.replace(":", "") for p in parts)


def _num(x: float) -> str:
    return f"{x:g}"


def expand_grid(
    guidance_scales: Sequence[float] = (10.0,),
    num_inference_steps: Sequence[int] = (12,),
    temperatures: Sequence[tuple[float, float]] = ((2.0, 0.0),),
    masking_schedules: Sequence[str | None] = (None,),
    guidance_schedules: Sequence[str] = ("constant",),
    checkpoints: Sequence[str | None] = (None,),
    loras: Sequence[str | None] = (None,),
    samplers: Sequence[str | Sampler | None] = (None,),
    guidance_intervals: Sequence[tuple[int, int] | None] = (None,),
) -> list[Setting]:
    """Every combination, checkpoint and adapter outermost (each model is loaded once), then sampler and guidance
    interval, guidance scale innermost. A guidance interval or a sampler's step window that does not fit one of
    the step counts is refused here, before anything is generated."""
    grid = itertools.product(
        checkpoints,
        loras,
        samplers,
        guidance_intervals,
        masking_schedules,
        guidance_schedules,
        temperatures,
        num_inference_steps,
        guidance_scales,
    )
    settings = []
    for ck, lo, sa, gi, ms, gs, t, n, g in grid:
        try:
            setting = Setting(
                guidance_scale=float(g),
                num_inference_steps=int(n),
                temperature=(float(t[0]), float(t[1])),
                masking_schedule=ms,
                guidance_schedule=gs,
                checkpoint=ck,
                lora=lo,
                sampler=sa,
                guidance_interval=gi,
            )
        except ValueError as e:
            raise ValueError(f"at {int(n)} steps: {e}") from None
        settings.append(setting)
    if len(set(settings)) != len(settings):
        raise ValueError("the grid repeats a setting; remove the duplicate values")
    return settings


def image_seed(seed: int, prompt_index: int) -> int:
    """The generator seed of image (prompt_index, seed)."""
    if not 0 <= prompt_index < SEED_STRIDE:
        raise ValueError(f"at most {SEED_STRIDE} prompts per run (prompt index {prompt_index})")
    if seed < 0:
        raise ValueError(f"seeds must be >= 0, got {seed}")
    return seed * SEED_STRIDE + prompt_index


# generate(setting, prompts, seeds) -> one PIL image per prompt, image i drawn from a generator seeded with seeds[i].
# A generate object may also have prepare(setting), called untimed before a setting's first batch (model loading).
GenerateFn = Callable[[Setting, list[str], list[int]], list[PIL.Image.Image]]


@dataclass
class ImageRecord:
    prompt_index: int
    seed: int
    prompt: str
    file: str  # relative to the output folder
    seconds: float  # generation wall time of its batch divided by the batch size

    @property
    def name(self) -> str:
        return Path(self.file).stem


@dataclass
class SettingImages:
    """The images of one setting, in (seed, prompt) order, and how many this run generated."""

    setting: Setting
    key: str
    records: list[ImageRecord]
    generated: int = 0

    @property
    def seconds_per_image(self) -> float | None:
        return sum(r.seconds for r in self.records) / len(self.records) if self.records else None


@dataclass
class Manifest:
    """What has been generated: {setting key: {"setting", "label", "context", "images": {name: record}}}."""

    path: Path
    settings: dict = field(default_factory=dict)

    @classmethod
    def load(cls, out_dir: Path) -> "Manifest":
        path = out_dir / MANIFEST_NAME
        if not path.exists():
            return cls(path)
        data = json.loads(path.read_text())
        if data.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path} is not a manifest of version {MANIFEST_VERSION}; use a new output folder")
        return cls(path, data["settings"])

    def save(self) -> None:
        """Write atomically: an interrupted run leaves the previous manifest, never half of one."""
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"version": MANIFEST_VERSION, "settings": self.settings}, indent=1))
        os.replace(tmp, self.path)

    def entry(self, setting: Setting, key: str, context: dict) -> dict:
        return self.settings.setdefault(
            key, {"setting": setting.as_dict(), "label": setting.label(), "context": context, "images": {}}
        )


def run_sweep(
    generate: GenerateFn,
    settings: Sequence[Setting],
    prompts: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    batch_size: int = 8,
    context: dict | None = None,
    progress: bool = True,
) -> list[SettingImages]:
    """Generate every (setting, prompt, seed) image not already in `out_dir`, `batch_size` images per call."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts or not seeds:
        raise ValueError("need at least one prompt and one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = context or {}
    manifest = Manifest.load(out_dir)
    jobs = [(s, i) for s in seeds for i in range(len(prompts))]  # (seed, prompt index)

    plan = []  # (setting, key, entry, pending jobs)
    for setting in settings:
        key = setting.key(context)
        entry = manifest.entry(setting, key, context)
        pending = [(s, i) for s, i in jobs if not _is_done(entry, out_dir, _image_name(i, s), prompts[i])]
        plan.append((setting, key, entry, pending))

    results = []
    bar = tqdm(total=sum(len(p) for *_, p in plan), desc="generating", unit="img", disable=not progress)
    prepare = getattr(generate, "prepare", None)  # optional: load the setting's model outside the timed calls
    for setting, key, entry, pending in plan:
        folder = out_dir / "images" / key
        folder.mkdir(parents=True, exist_ok=True)
        if pending and prepare is not None:
            prepare(setting)
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            batch_prompts = [prompts[i] for _, i in batch]
            t0 = time.perf_counter()
            images = generate(setting, batch_prompts, [image_seed(s, i) for s, i in batch])
            seconds = (time.perf_counter() - t0) / len(batch)
            if len(images) != len(batch):
                raise RuntimeError(f"the generator returned {len(images)} images for {len(batch)} prompts")
            for (s, i), image in zip(batch, images):
                name = _image_name(i, s)
                image.save(folder / f"{name}.png")
                entry["images"][name] = asdict(
                    ImageRecord(
                        prompt_index=i, seed=s, prompt=prompts[i], file=f"images/{key}/{name}.png", seconds=seconds
                    )
                )
            manifest.save()  # after every batch: an interrupted sweep resumes from here
            bar.update(len(batch))
        manifest.save()
        records = [ImageRecord(**entry["images"][_image_name(i, s)]) for s, i in jobs]
        results.append(SettingImages(setting, key, records, generated=len(pending)))
    bar.close()
    return results


def _image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:06d}_s{seed}"


def _is_done(entry: dict, out_dir: Path, name: str, prompt: str) -> bool:
    record = entry["images"].get(name)
    return record is not None and record["prompt"] == prompt and (out_dir / record["file"]).is_file()
