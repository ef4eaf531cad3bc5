"""The aMUSEd pipeline: text to image, image to image and inpainting, composed from our networks and `sampling`.

    prompt -> CLIP text tower -> TextConditioning (B, D) + (B, 77, D)
    start tokens (B, h, w): all masked (text to image) / VQ tokens of the image, partly masked (image to image,
    inpainting)
    for each step: U-ViT logits (2B, h, w, K) -> guidance -> sampling.sample_step (the chosen sampler) -> tokens
    tokens -> VQ-GAN decode -> pixels in [0, 1]

With default arguments every call computes what diffusers' AmusedPipeline / AmusedImg2ImgPipeline /
AmusedInpaintPipeline compute, token for token, consuming the caller's generator in the same order. Argument names
follow those pipelines. Where the reference is defective we differ, and say so:
  - image to image at strength 1.0 masks every token (the reference masks none and returns the input);
  - inpainting uses the linear schedule for its own calls only (the reference switches a shared scheduler to it
    for good);
  - inpainting can paste the original pixels back outside the mask (`paste_unmasked=True`; off by default);
  - prompt embeddings without negative embeddings work (the negative prompt is encoded), a single negative prompt
    applies to every prompt, a list of generators gives each image its own random stream.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import sampling
from convert import load_components
from convert.lora import load_lora_into
from sampling import Generators, MaskingSchedule, ScheduleLike

from .acceleration import CUDAGraphForward
from .images import ImageArray, ImageInput, image_to_tensor, mask_to_tensor, to_numpy, to_pil
from .shapes.embedded import model_dir as default_model_dir
from .text import TextConditioning, encode_text

OUTPUT_TYPES = ("pil", "np", "latent")
MASK_COUNT_BASES = ("sequence", "masked")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_finite(name: str, value, whole=None) -> None:
    """Raise unless `value` is a finite real number (not a bool, not a string); `whole` is what the user passed
    when `value` is part of it."""
    shown = value if whole is None else whole
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()):
            raise ValueError(f"{name} must be a number, got {shown!r}")
        value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {shown!r}")


@dataclass
class SamplingOptions:
    """The arguments common to `Pipeline.__call__`, `img2img` and `inpaint` (names and defaults of the reference).

    negative_prompt: str or one per prompt; "" when guidance is on and none is given.
    num_inference_steps: decoding steps N (img2img / inpaint run the last int(N * strength) of them).
    guidance_scale: classifier-free guidance, on when > 1.
    generator: a torch.Generator, or a list with one per image (image i then draws only from generator i).
    num_images_per_prompt: images per prompt; the batch is tiled [p0, p1, p0, p1, ...] as the reference.
    temperature: re-masking (Gumbel) temperature, a (start, end) pair annealed linearly, or a start value
        annealed to 0.01.
    micro_conditioning_aesthetic_score, micro_conditioning_crop_coord: micro-conditions of the U-ViT.
    output_type: "pil" (list of images), "np" (float array (N, H, W, 3) in [0, 1]), "latent" (ids (N, h, w)).
    callback(step, timestep, tokens): called every `callback_steps` steps with the tokens (N, h, w) after the step
        (decoding steps only, not the refinement passes).
    prompt_embeds + encoder_hidden_states: precomputed text conditioning instead of `prompt` (both or neither);
    negative_prompt_embeds + negative_encoder_hidden_states: the same for the negative prompt (optional).
    Knobs beyond the reference (defaults reproduce it):
    masking_schedule: None = the pipeline's (cosine; linear for inpainting), or 'cosine', 'linear', 'arccos',
        'power', 'power:<exponent>', a sampling.MaskingSchedule.
    sampler: which positions stay masked after each step: 'confidence' (the reference), 'halton', 'random',
        'remask', or a sampling.Sampler with parameters (e.g. sampling.HaltonSampler(random_offset=True),
        sampling.RemaskSampler(eta=0.2, steps=(2, 10))); see sampling.samplers for what each guarantees. Every
        sampler leaves the scheduled number of tokens masked and never changes a token that was known when the call
        started (only 'remask' masks again tokens decoded during the call).
    sampling_temperature: divides the logits before each token draw (1 = the reference); a (start, end) pair is
        annealed linearly from step 0 to step N - 1 (sampling.token_temperatures).
    guidance_schedule: 'constant' (the reference), 'linear', 'cosine', 'power-cosine' or 'power-cosine:<exponent>'
        (MaskBit's, exponent 3 by default) ramps up to guidance_scale, or a sampling.GuidanceSchedule.
    guidance_interval: None = guidance at every step (the reference); (start, end) = guidance only at the 0-based
        steps start <= i < end of the N steps (0 <= start <= end <= N). The other steps run the U-ViT on the B
        conditional rows alone instead of 2B rows (no unconditional pass): a text-to-image call of B images saves
        B x (N - (end - start)) U-ViT rows; image to image and inpainting save B per step they run outside it.
        Without guidance (guidance_scale <= 1) every step is conditional only and the interval changes nothing.
    mask_count_base: 'sequence' = masked counts are a fraction of the whole token grid (the reference), 'masked' =
        a fraction of each image's tokens masked at the start.
    refine_steps: refinement passes after the last step (0 = none, the reference): each masks every token decoded
        during the call with probability refine_ratio and puts back the most likely code of each masked one, the
        rest fixed, under the last step's guidance (sampling.refine). One U-ViT evaluation per pass.
    refine_ratio: the passes' masking probability in (0, 1], or a (start, end) pair annealed linearly over them.
    progress_bar: show a tqdm bar over the steps.
    """

    negative_prompt: str | Sequence[str] | None = None
    num_inference_steps: int = 12
    guidance_scale: float = 10.0
    generator: Generators = None
    num_images_per_prompt: int = 1
    temperature: float | tuple[float, float] = (2, 0)
    micro_conditioning_aesthetic_score: float = 6
    micro_conditioning_crop_coord: tuple[int, int] = (0, 0)
    output_type: str = "pil"
    callback: Callable[[int, int, torch.Tensor], None] | None = None
    callback_steps: int = 1
    prompt_embeds: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_encoder_hidden_states: torch.Tensor | None = None
    masking_schedule: ScheduleLike | None = None
    sampler: str | sampling.Sampler = "confidence"
    sampling_temperature: float | tuple[float, float] = 1.0
    guidance_schedule: str | sampling.GuidanceSchedule = "constant"
    guidance_interval: tuple[int, int] | None = None
    mask_count_base: str = "sequence"
    refine_steps: int = 0
    refine_ratio: float | tuple[float, float] = 0.3
    progress_bar: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "SamplingOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown argument(s) {', '.join(unknown)}; the options are: {', '.join(sorted(names))}")
        return cls(**kwargs)

    def __post_init__(self):
        for name in ("num_inference_steps", "num_images_per_prompt", "callback_steps"):
            value = getattr(self, name)
            if not _is_integer(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self._check_numbers()
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
        self._check_sampling_temperature()
        self._check_refinement()
        try:
            sampling.GuidanceSchedule.parse(self.guidance_schedule)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"guidance_schedule must be one of {', '.join(sampling.GUIDANCE_SCHEDULES)} (or 'power-cosine:<exponent>'), "
                f"got {self.guidance_schedule!r}: {e}"
            ) from None
        if self.guidance_interval is not None:
            self.guidance_interval = sampling.check_interval(
                self.guidance_interval, "guidance_interval", self.num_inference_steps
            )
        try:
            self.sampler = sampling.make_sampler(self.sampler)
        except TypeError as e:
            raise ValueError(f"sampler: {e}") from None
        self.sampler.check(self.num_inference_steps)
        if self.mask_count_base not in MASK_COUNT_BASES:
            raise ValueError(
                f"mask_count_base must be one of {', '.join(MASK_COUNT_BASES)}, got {self.mask_count_base!r}"
            )
        if self.masking_schedule is not None:
            self.masking_schedule = MaskingSchedule.parse(self.masking_schedule)
        for a, b in (
            ("prompt_embeds", "encoder_hidden_states"),
            ("negative_prompt_embeds", "negative_encoder_hidden_states"),
        ):
            if (getattr(self, a) is None) != (getattr(self, b) is None):
                raise ValueError(f"pass both `{a}` and `{b}`, or neither")
        self._check_embeddings()

    def _check_numbers(self) -> None:
        """Every float option is a finite number: NaN or inf would silently switch re-masking or guidance off, or
        crash the token draw."""
        _require_finite("guidance_scale", self.guidance_scale)
        _require_finite("micro_conditioning_aesthetic_score", self.micro_conditioning_aesthetic_score)
        if isinstance(self.temperature, (tuple, list)):
            if len(self.temperature) != 2:
                raise ValueError(f"temperature must be a number or a (start, end) pair, got {self.temperature!r}")
            for value in self.temperature:
                _require_finite("temperature", value, whole=self.temperature)
        else:
            _require_finite("temperature", self.temperature)
        crop = self.micro_conditioning_crop_coord
        if not isinstance(crop, (tuple, list)) or len(crop) != 2:
            raise ValueError(f"micro_conditioning_crop_coord must be a (top, left) pair, got {crop!r}")
        for value in crop:
            _require_finite("micro_conditioning_crop_coord", value, whole=crop)

    def _check_embeddings(self) -> None:
        """Precomputed text conditioning: tensors of finite values (NaN would reach the token draw)."""
        for name in (
            "prompt_embeds",
            "encoder_hidden_states",
            "negative_prompt_embeds",
            "negative_encoder_hidden_states",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(
                    f"{name} must be a float tensor, got {type(value).__name__} {getattr(value, 'dtype', '')}".rstrip()
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} holds NaN or infinite values")

    def _check_sampling_temperature(self):
        t = self.sampling_temperature
        values = t if isinstance(t, (tuple, list)) else (t,)
        if isinstance(t, (tuple, list)) and len(t) != 2:
            raise ValueError(f"sampling_temperature must be a number or a (start, end) pair, got {t!r}")
        for v in values:
            try:
                ok = not isinstance(v, bool) and math.isfinite(float(v)) and float(v) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(
                    f"sampling_temperature must be finite and > 0 (a number or a (start, end) pair), got {t!r}"
                )

    def _check_refinement(self) -> None:
        if not _is_integer(self.refine_steps) or self.refine_steps < 0:
            raise ValueError(f"refine_steps must be an integer >= 0, got {self.refine_steps!r}")
        r = self.refine_ratio
        values = r if isinstance(r, (tuple, list)) else (r,)
        if isinstance(r, (tuple, list)) and len(r) != 2:
            raise ValueError(f"refine_ratio must be a number or a (start, end) pair, got {r!r}")
        for v in values:
            _require_finite("refine_ratio", v, whole=r)
            if not 0.0 < float(v) <= 1.0:
                raise ValueError(f"refine_ratio must lie in (0, 1] (a number or a (start, end) pair), got {r!r}")

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def guided_at(self, step: int) -> bool:
        """Whether step `step` (0-based) computes the unconditional rows and applies guidance."""
        if not self.guided:
            return False
        return self.guidance_interval is None or self.guidance_interval[0] <= step < self.guidance_interval[1]


class NonFiniteLogitsError(ValueError):
    """The U-ViT produced NaN or infinite logits during decoding."""


class _FiniteLogits:
    """Watches the decoding loop's (guided) logits for NaN / inf without a device sync per step: each step's logits
    get a finiteness flag computed on the device and their non-finite entries replaced by 0, so the token draw never
    sees them (torch.multinomial would fail on them, on a GPU with a device-side assert); the flags are read once,
    at the last step (or refinement pass), which raises if any had non-finite logits. Finite logits pass through
    unchanged. Steps are numbered 0 .. num_steps - 1, then the refinement passes num_steps .. num_steps + passes - 1."""

    def __init__(self, num_steps: int, passes: int = 0):
        self.num_steps, self.passes = num_steps, passes
        self.flags: list[tuple[int, torch.Tensor]] = []

    def __call__(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        finite = torch.isfinite(logits).all()
        self.flags.append((step, finite))
        if step == self.num_steps + self.passes - 1:
            self._raise_if_any()
        return logits.nan_to_num(0.0, 0.0, 0.0)

    def _where(self, step: int) -> str:
        if step < self.num_steps:
            return f"decoding step {step + 1} of {self.num_steps}"
        return f"refinement pass {step - self.num_steps + 1} of {self.passes}"

    def _raise_if_any(self) -> None:
        seen = torch.stack([flag for _, flag in self.flags]).cpu()
        if bool(seen.all()):
            return
        first = self.flags[int((~seen).nonzero()[0])][0]
        raise NonFiniteLogitsError(
            f"the U-ViT's logits became NaN or infinite (first at {self._where(first)}): the "
            "model's weights or the inputs (prompt embeddings, micro-conditioning, guidance scale) hold non-finite "
            "values, or the weights' dtype overflows (try float32)"
        )


def checked_sampling_defaults(defaults) -> dict[str, Any]:
    """A model's declared sampling defaults (a dict of SamplingOptions fields), checked as a call's options are;
    a ValueError names what is wrong."""
    if defaults is None:
        return {}
    if not isinstance(defaults, dict):
        raise ValueError(f"sampling_defaults must map option names to values, got {type(defaults).__name__}")
    try:
        SamplingOptions.from_kwargs(dict(defaults))
    except (TypeError, ValueError) as e:
        raise ValueError(f"sampling_defaults are invalid: {e}") from None
    return dict(defaults)


@dataclass
class _Start:
    """Where decoding starts: the tokens (B, h, w), the first step, and how the masked counts are scaled."""

    tokens: torch.Tensor
    first_step: int
    starting_mask_ratio: float | torch.Tensor = 1.0
    schedule: MaskingSchedule | None = None


class Pipeline:
    """Text to image (`pipe(prompt)`), image to image (`pipe.img2img`) and inpainting (`pipe.inpaint`) with aMUSEd.

    Build it from loaded components (`Pipeline.from_pretrained(path_or_id)`) or from the networks:
    transformer (uvit.UViT), vqvae (vqgan.VQGAN), text_encoder (transformers CLIPTextModelWithProjection),
    tokenizer (CLIPTokenizer). `masking_schedule` is the schedule of text to image and image to image."""

    inpaint_masking_schedule = MaskingSchedule("linear")  # the reference's inpainting schedule

    def __init__(
        self,
        transformer,
        vqvae,
        text_encoder,
        tokenizer,
        masking_schedule: ScheduleLike = "cosine",
        mask_token_id: int | None = None,
        sampling_defaults: dict[str, Any] | None = None,
    ):
        self.transformer = transformer
        self.vqvae = vqvae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.masking_schedule = MaskingSchedule.parse(masking_schedule)
        self.mask_token_id = transformer.mask_token_id if mask_token_id is None else int(mask_token_id)
        cfg = transformer.config
        if self.mask_token_id < cfg.codebook_size or self.mask_token_id >= cfg.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} must be a U-ViT input id outside the codebook "
                f"([{cfg.codebook_size}, {cfg.vocab_size}))"
            )
        if vqvae.quantizer.num_codes != cfg.codebook_size:
            raise ValueError(
                f"the VQ-GAN has {vqvae.quantizer.num_codes} codes but the U-ViT predicts {cfg.codebook_size}"
            )
        # Sampling defaults a model folder may declare (e.g. a lower guidance scale for a small model); arguments
        # given to a call override them, and without them every default is the reference's.
        self.sampling_defaults = checked_sampling_defaults(sampling_defaults)  # bad ones fail here, not mid-call
        # The U-ViT call of the decoding loop, (ids, uvit.Conditioning) -> logits (B, h, w, K): None = the
        # transformer's `forward_prepared`, or a replacement computing the same (the CUDA-graph replay, torch.compile).
        self._transformer_forward = None

    # --- construction and placement ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
    ) -> "Pipeline":
        """Load a published folder / hub id (diffusers layout), one of ours or an open-muse checkpoint folder, through
        `convert.load_components`; None loads the embedded default model. `torch_dtype` is diffusers' name for
        `dtype` (either may be given, not both)."""
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
            dtype = torch_dtype
        path_or_id = default_model_dir() if path_or_id is None else path_or_id
        c = load_components(str(path_or_id), dtype=dtype, device=device, variant=variant)
        cfg = c.scheduler_config or {}
        try:
            checked_sampling_defaults(cfg.get("sampling_defaults"))
        except ValueError as e:
            raise ValueError(f"{path_or_id}: its scheduler config's {e}") from None
        return cls(
            c.transformer,
            c.vqvae,
            c.text_encoder,
            c.tokenizer,
            masking_schedule=cfg.get("masking_schedule", "cosine"),
            mask_token_id=cfg.get("mask_token_id"),
            sampling_defaults=cfg.get("sampling_defaults"),
        )

    def load_lora(self, path: str | Path, merge: bool = False) -> "Pipeline":
        """Load a LoRA adapter into the transformer: ours (`lora.safetensors`), the diffusers/peft file
        (`pytorch_lora_weights.safetensors`) or a peft folder; `merge=True` folds it into the weights."""
        load_lora_into(self.transformer, path, merge=merge)
        self._transformer_forward = None  # captured CUDA graphs would replay the old weights
        return self

    def load_lora_weights(self, path_or_dict, weight_name: str | None = None, adapter_name: str | None = None, **_):
        """diffusers' name for `load_lora`: a folder (with `weight_name` inside it, if given), a file, or a dict of
        tensors in either format. One adapter at a time: `adapter_name` is accepted and ignored."""
        if weight_name is not None and not isinstance(path_or_dict, dict):
            path_or_dict = Path(path_or_dict) / weight_name
        return self.load_lora(path_or_dict)

    def enable_cuda_graphs(self, enabled: bool = True) -> "Pipeline":
        """Replay the U-ViT's forward from CUDA graphs (one capture per batch/grid shape): same logits, far fewer
        kernel launches. Needs the transformer on a CUDA device; call again after moving or changing it."""
        self._transformer_forward = CUDAGraphForward(self.transformer) if enabled else None
        return self

    def compile_transformer(self, **compile_kwargs) -> "Pipeline":
        """Run the decoding loop's U-ViT call through `torch.compile` (arguments as torch.compile's, e.g.
        mode="max-autotune"); the first call of each shape compiles. Call again after moving or changing the model."""
        self._transformer_forward = torch.compile(self.transformer.forward_prepared, **compile_kwargs)
        return self

    def to(
        self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None
    ) -> "Pipeline":
        """Move (and cast) the three networks. As in diffusers, `pipe.to(torch.float16)` casts only."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for m in (self.transformer, self.vqvae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        self._transformer_forward = None  # captured CUDA graphs are stale now
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per token side (16 for the published VQ-GAN)."""
        return self.vqvae.downsample_factor

    # --- text -----------------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt(s) -> (prompt_embeds (B, D), encoder_hidden_states (B, 77, D)), ready to pass back as arguments."""
        cond = encode_text(self.tokenizer, self.text_encoder, [prompt] if isinstance(prompt, str) else list(prompt))
        return cond.prompt_embeds, cond.encoder_hidden_states

    def _text_conditioning(self, prompt, opts: SamplingOptions) -> TextConditioning:
        """The U-ViT's text batch: rows [negative x N; positive x N] with guidance, positive x N without
        (N = num_images_per_prompt, tiled). Each prompt batch is encoded in its own text-encoder call, as the
        reference does."""
        if (prompt is None) == (opts.prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts:
                raise ValueError("prompt is an empty list; pass at least one prompt")
            positive = encode_text(self.tokenizer, self.text_encoder, prompts)
        else:
            positive = TextConditioning(opts.prompt_embeds, opts.encoder_hidden_states)
        n = len(positive)
        cond = positive.repeat(opts.num_images_per_prompt)
        if not opts.guided:
            return cond
        if opts.negative_prompt_embeds is not None:
            negative = TextConditioning(opts.negative_prompt_embeds, opts.negative_encoder_hidden_states)
        else:
            neg = opts.negative_prompt
            negatives = [""] * n if neg is None else [neg] * n if isinstance(neg, str) else list(neg)
            if len(negatives) != n:
                raise ValueError(
                    f"got {len(negatives)} negative prompts for {n} prompts; pass one per prompt or a single one"
                )
            negative = encode_text(self.tokenizer, self.text_encoder, negatives)
        if len(negative) != n:
            raise ValueError(f"negative embeddings have {len(negative)} rows but there are {n} prompts")
        return TextConditioning.cat(negative.repeat(opts.num_images_per_prompt), cond)

    # --- the three calls --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        **options,
    ):
        """Text to image. `height`/`width` default to the model's sample size; `latents` (N, h, w) are optional
        starting tokens (mask id where unknown). Other arguments: see `SamplingOptions`."""
        opts = self._options(options)
        f = self.vae_scale_factor
        default = self.transformer.config.sample_size * f
        height = default if height is None else height
        width = default if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not _is_integer(v) or v < 1:
                raise ValueError(f"{name} must be a positive number of pixels, got {v!r}")
            if v % f:
                raise ValueError(f"{name} {v} is not a multiple of {f} pixels (one token is {f}x{f} pixels)")
        grid = (height // f, width // f)
        self._check_grid(grid)
        cond = self._text_conditioning(prompt, opts)
        batch = len(cond) // 2 if opts.guided else len(cond)
        if latents is None:
            tokens = torch.full((batch, *grid), self.mask_token_id, dtype=torch.long, device=self.device)
        else:
            if tuple(latents.shape) != (batch, *grid):
                raise ValueError(f"latents must be {(batch, *grid)} token ids, got {tuple(latents.shape)}")
            tokens = latents.to(self.device, torch.long)
        start = _Start(tokens, first_step=0, schedule=opts.masking_schedule or self.masking_schedule)
        return self._generate(start, cond, (height, width), opts)

    @torch.no_grad()
    def img2img(self, prompt: str | Sequence[str] | None, image: ImageInput, strength: float = 0.5, **options):
        """Image to image: the image's tokens, each masked with probability schedule(start / N), are decoded for the
        last int(N * strength) steps (start = N - that). At strength 1 every token is masked (the reference masks
        none: a defect). `image`: one image (used for every prompt) or one per prompt, sides multiples of 16 px."""
        opts = self._options(options)
        first = self._first_step(strength, opts.num_inference_steps)
        cond = self._text_conditioning(prompt, opts)
        pixels, tokens = self._encode_image(image, len(cond), opts)
        schedule = opts.masking_schedule or self.masking_schedule
        ratio = sampling.mask_ratio(schedule, first - 1, opts.num_inference_steps, device=tokens.device)
        if isinstance(opts.generator, torch.Generator) or opts.generator is None:
            # the reference's order: mask the per-prompt tokens with the one generator, then tile
            tokens = sampling.random_mask(tokens, ratio, self.mask_token_id, opts.generator)
            tokens = tokens.repeat(opts.num_images_per_prompt, 1, 1)
        else:  # one generator per image: tile first, then each image masks its own tokens
            tokens = tokens.repeat(opts.num_images_per_prompt, 1, 1)
            tokens = sampling.random_mask(tokens, ratio, self.mask_token_id, opts.generator)
        start = _Start(tokens, first_step=first, schedule=schedule)
        return self._generate(start, cond, tuple(pixels.shape[-2:]), opts)

    @torch.no_grad()
    def inpaint(
        self,
        prompt: str | Sequence[str] | None,
        image: ImageInput,
        mask_image: ImageInput,
        strength: float = 1.0,
        paste_unmasked: bool = False,
        **options,
    ):
        """Inpainting: tokens under the mask (white = repaint; the mask is brought straight to the token grid and
        binarised at 0.5) are masked and decoded over the last int(N * strength) steps with the linear schedule;
        the masked counts are scaled by the masked fraction (the reference's rule). The whole image is decoded from
        tokens, so pixels outside the mask are VQ reconstructions; `paste_unmasked=True` puts the original pixels
        back there (using the mask at full resolution)."""
        opts = self._options(options)
        if paste_unmasked and opts.output_type == "latent":
            raise ValueError("paste_unmasked works on pixels; it cannot return output_type='latent'")
        first = self._first_step(strength, opts.num_inference_steps)
        cond = self._text_conditioning(prompt, opts)
        pixels, tokens = self._encode_image(image, len(cond), opts)
        token_mask, pixel_mask = mask_to_tensor(mask_image, tuple(pixels.shape[-2:]), tuple(tokens.shape[-2:]))
        if token_mask.shape[0] not in (1, tokens.shape[0]):
            raise ValueError(
                f"got {token_mask.shape[0]} masks for {tokens.shape[0]} images; pass one mask or one per image"
            )
        token_mask = token_mask.to(tokens.device).expand_as(tokens)
        if not token_mask.any():
            raise ValueError(
                "mask_image masks no token (no area at or above 0.5 at the token grid): nothing to repaint"
            )
        tokens = torch.where(token_mask, self.mask_token_id, tokens)
        masked_fraction = token_mask.sum() / tokens.numel()  # over the whole batch, as the reference
        tokens = tokens.repeat(opts.num_images_per_prompt, 1, 1)
        start = _Start(tokens, first, masked_fraction, opts.masking_schedule or self.inpaint_masking_schedule)
        out = self._generate(start, cond, tuple(pixels.shape[-2:]), opts, return_pixels=paste_unmasked)
        if not paste_unmasked:
            return out
        n = opts.num_images_per_prompt
        original = pixels.to(out.device).expand(len(tokens) // n, -1, -1, -1).repeat(n, 1, 1, 1)
        keep = pixel_mask.to(out.device).expand(len(tokens) // n, -1, -1, -1).repeat(n, 1, 1, 1)
        return self._format(torch.where(keep, out, original), opts.output_type)

    # --- shared machinery -------------------------------------------------------------------------------------------
    def _options(self, options: dict[str, Any]) -> SamplingOptions:
        """A call's arguments over the model's declared sampling defaults over the reference's."""
        return SamplingOptions.from_kwargs({**self.sampling_defaults, **options})

    @staticmethod
    def _first_step(strength: float, num_steps: int) -> int:
        """Index of the first step run for `strength` (the last int(N * strength) steps run)."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}")
        n = int(num_steps * strength)
        if n < 1:
            raise ValueError(
                f"strength {strength} of {num_steps} steps runs no step (int(steps * strength) = 0); raise either"
            )
        return num_steps - n

    def _check_grid(self, grid: tuple[int, int]) -> None:
        g = self.transformer.config.grid_factor
        if grid[0] % g or grid[1] % g or min(grid) < 1:
            f = self.vae_scale_factor
            raise ValueError(
                f"a {grid[1] * f}x{grid[0] * f} image is a {grid[1]}x{grid[0]} token grid, but this model needs token "
                f"grid sides that are positive multiples of {g} (image sides multiples of {g * f} px)"
            )

    def _encode_image(self, image: ImageInput, rows: int, opts: SamplingOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """image(s) -> (pixels (P, 3, H, W), VQ tokens (P, h, w)), P = the number of prompts (a single image is used
        for every prompt)."""
        prompts = rows // (2 if opts.guided else 1) // opts.num_images_per_prompt
        pixels = image_to_tensor(image, self.vae_scale_factor)
        if pixels.shape[0] not in (1, prompts):
            raise ValueError(f"got {pixels.shape[0]} images for {prompts} prompts; pass one image or one per prompt")
        self._check_grid((pixels.shape[-2] // self.vae_scale_factor, pixels.shape[-1] // self.vae_scale_factor))
        tokens = self.vqvae.encode(pixels.to(self.vqvae.device, self.vqvae.dtype)).to(self.device)
        if tokens.shape[0] != prompts:
            pixels, tokens = pixels.expand(prompts, -1, -1, -1), tokens.expand(prompts, -1, -1).clone()
        return pixels, tokens

    def _generate(
        self, start: _Start, cond: TextConditioning, size: tuple[int, int], opts: SamplingOptions, return_pixels=False
    ):
        """Decode from `start` and format the output (or return pixels (B, 3, H, W) in [0, 1] when `return_pixels`)."""
        tokens = self._decode(start, cond, size, opts)
        if opts.output_type == "latent" and not return_pixels:
            return tokens
        pixels = self.vqvae.decode(tokens.to(self.vqvae.device)).clamp(0, 1)  # (B, 3, H, W) fp32
        return pixels if return_pixels else self._format(pixels, opts.output_type)

    @staticmethod
    def _format(pixels: torch.Tensor, output_type: str):
        """pixels (B, 3, H, W) in [0, 1] -> float array (B, H, W, 3) ("np") or PIL images ("pil")."""
        images = to_numpy(pixels)
        return images.view(ImageArray) if output_type == "np" else to_pil(images)

    def _decode(
        self, start: _Start, cond: TextConditioning, size: tuple[int, int], opts: SamplingOptions
    ) -> torch.Tensor:
        """The decoding loop: tokens (B, h, w) -> fully decoded tokens (B, h, w). A guided step runs the U-ViT on 2B
        rows ([unconditional; conditional]); a step outside `guidance_interval` (or any step without guidance) on the
        B conditional rows."""
        tokens = start.tokens
        B, h, w = tokens.shape
        N, device = opts.num_inference_steps, self.device
        if isinstance(opts.generator, (list, tuple)) and len(opts.generator) != B:
            raise ValueError(f"got {len(opts.generator)} generators for {B} images; pass one per image or a single one")
        cond = cond.to(device, self.transformer.dtype)
        H, W = size
        crop = opts.micro_conditioning_crop_coord
        micro = torch.tensor(
            [W, H, crop[0], crop[1], opts.micro_conditioning_aesthetic_score],
            device=device,
            dtype=cond.encoder_hidden_states.dtype,
        )[None].expand(len(cond), -1)  # (rows, 5), the same row for every sample
        self.transformer.check_inputs(
            tokens.repeat(len(cond) // B, 1, 1), cond.encoder_hidden_states, cond.prompt_embeds, micro
        )
        # what the U-ViT derives from the text alone (modulations, cross-attention keys and values), once per call
        prepared = self.transformer.prepare(cond.encoder_hidden_states, cond.prompt_embeds, micro)
        forward = self.transformer.forward_prepared if self._transformer_forward is None else self._transformer_forward

        remask_temperatures = sampling.remask_temperatures(N, opts.temperature, device=device)
        token_temperatures = sampling.token_temperatures(N, opts.sampling_temperature)
        scales = sampling.guidance_scales(N, opts.guidance_scale, opts.guidance_schedule)
        ratio, num_tokens = start.starting_mask_ratio, None
        if opts.mask_count_base == "masked":
            # a fraction of each image's initially masked tokens, rescaled so the count at the start is all of them
            num_tokens = (tokens == self.mask_token_id).sum(dim=(1, 2))[:, None]
            ratio = 1.0 / sampling.mask_ratio(start.schedule, start.first_step - 1, N, device=device)
        steps = range(start.first_step, N)
        # steps outside the guidance interval run the conditional rows [B:] only, with their slice of `prepared`
        conditional = (
            _rows(prepared, slice(B, None)) if any(opts.guided and not opts.guided_at(i) for i in steps) else None
        )
        sampler = opts.sampler
        state = sampler.start(tokens.reshape(B, h * w), (h, w), self.mask_token_id, opts.generator)

        screen = _FiniteLogits(N, opts.refine_steps)
        for i in tqdm(steps, desc="decoding", disable=not opts.progress_bar):
            if opts.guided_at(i):
                logits = forward(torch.cat([tokens, tokens]), prepared)  # (2B, h, w, K)
                logits = sampling.classifier_free_guidance(logits, scales[i])  # (B, h, w, K)
            else:
                logits = forward(tokens, conditional if opts.guided else prepared)  # (B, h, w, K)
            logits = screen(logits, i)
            flat, _, state = sampling.sample_step(
                logits.reshape(B, h * w, -1),
                tokens.reshape(B, h * w),
                i,
                N,
                sampler=sampler,
                state=state,
                mask_token_id=self.mask_token_id,
                schedule=start.schedule,
                remask_temperature=remask_temperatures[i],
                generator=opts.generator,
                starting_mask_ratio=ratio,
                num_tokens=num_tokens,
                sampling_temperature=token_temperatures[i],
            )
            tokens = flat.view(B, h, w)
            if opts.callback is not None and i % opts.callback_steps == 0:
                opts.callback(i, N - 1 - i, tokens)
        if opts.refine_steps:
            editable = start.tokens == self.mask_token_id  # (B, h, w): decoded during this call
            if opts.guided_at(N - 1):  # the passes are guided as the last step was
                rows, scale = prepared, scales[N - 1]
            else:
                rows, scale = (conditional if opts.guided else prepared), None
            tokens = self._refine(tokens, editable, rows, forward, scale, screen, N, opts)
        return tokens

    def _refine(self, tokens, editable, prepared, forward, scale, screen, num_steps, opts) -> torch.Tensor:
        """The refinement passes (sampling.refine) after the decoding steps: tokens (B, h, w) -> (B, h, w). Guided
        (2B rows) when the last decoding step was (`scale` not None), else the conditional rows alone."""
        B, h, w = tokens.shape
        flat, editable = tokens.reshape(B, h * w), editable.reshape(B, h * w)
        ratios = sampling.refine_ratios(opts.refine_steps, opts.refine_ratio)
        for j, ratio in enumerate(tqdm(ratios, desc="refining", disable=not opts.progress_bar)):
            masked = sampling.refine_mask(editable, ratio, opts.generator)  # (B, L)
            x = torch.where(masked, self.mask_token_id, flat).view(B, h, w)
            if scale is not None:
                logits = sampling.classifier_free_guidance(forward(torch.cat([x, x]), prepared), scale)
            else:
                logits = forward(x, prepared)  # (B, h, w, K)
            logits = screen(logits, num_steps + j)
            flat = sampling.refine_step(logits.reshape(B, h * w, -1), flat, masked)
        return flat.view(B, h, w)


def _rows(tree, rows: slice):
    """The same rows of every tensor in a nest of (named) tuples, such as a uvit.Conditioning (every tensor's first
    dimension is the batch): a view, nothing is recomputed."""
    if isinstance(tree, torch.Tensor):
        return tree[rows]
    if isinstance(tree, tuple):
        parts = [_rows(t, rows) for t in tree]
        return type(tree)(*parts) if hasattr(tree, "_fields") else tuple(parts)
    return tree
