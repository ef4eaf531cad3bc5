"""The sweep's `generate(setting, prompts, seeds)` for `muse.Pipeline`."""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import torch

from muse.arguments import parse_sampler
from muse.pipeline import Pipeline, default_model_dir

from .sweep import Setting


class PipelineGenerator:
    """Generates a batch with `muse.Pipeline`, image i from a generator seeded with seeds[i] (on the pipeline's
    device), so every image is reproducible alone. Loads each (checkpoint, LoRA adapter) pair when a setting first
    needs it; `expand_grid` orders the settings so that each pair is needed in one stretch.

    default_model: the model of settings without a checkpoint (a folder or hub id; None: the embedded default)."""

    def __init__(
        self,
        default_model: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: str | None = None,
        negative_prompt: str | None = None,
    ):
        self.default_model, self.dtype, self.device = default_model, dtype, device
        self.negative_prompt = negative_prompt
        self._loaded: tuple | None = None
        self._pipe = None

    def model_path(self, setting: Setting) -> str:
        return str(setting.checkpoint or self.default_model or default_model_dir())

    def prepare(self, setting: Setting) -> None:
        """Load the setting's model (the sweep calls this outside the timed generate calls)."""
        self.pipeline(setting)

    def pipeline(self, setting: Setting):
        wanted = (self.model_path(setting), setting.lora)
        if self._loaded != wanted:
            self._pipe = None  # free the previous model first
            pipe = Pipeline.from_pretrained(wanted[0], dtype=self.dtype, device=self.device)
            if setting.lora:
                if not hasattr(pipe, "load_lora"):
                    raise NotImplementedError("this muse.Pipeline cannot load LoRA adapters (no load_lora) yet")
                pipe.load_lora(setting.lora)
            self._pipe, self._loaded = pipe, wanted
        return self._pipe

    def __call__(self, setting: Setting, prompts: list[str], seeds: list[int]) -> list[PIL.Image.Image]:
        pipe = self.pipeline(setting)
        options = dict(
            num_inference_steps=setting.num_inference_steps,
            guidance_scale=setting.guidance_scale,
            temperature=setting.temperature,
            guidance_schedule=setting.guidance_schedule,
            negative_prompt=self.negative_prompt,
            generator=[torch.Generator(device=pipe.device).manual_seed(s) for s in seeds],
            output_type="pil",
            progress_bar=False,
        )
        if setting.masking_schedule is not None:
            options["masking_schedule"] = setting.masking_schedule
        if setting.sampler is not None:
            options["sampler"] = parse_sampler(setting.sampler)
        if setting.guidance_interval is not None:
            options["guidance_interval"] = setting.guidance_interval
        return pipe(list(prompts), **options)
