"""One step of confidence-based parallel decoding (MaskGIT), as pure tensor functions.

A step, for a batch of flattened token sequences (B, L) and the model's logits (B, L, K):
  1. draw a code for every position from softmax(logits / sampling_temperature) (known tokens keep their value);
  2. on the last step, that is the result;
  3. otherwise score each newly drawn token by log p(token) + remask_temperature * Gumbel noise, and mask again the
     `n` lowest-scoring ones (tokens known before the step are never re-masked: they get the highest score).

Random numbers, per step, in the reference's order: the multinomial draw over every position first, then one
uniform per position for the Gumbel noise, both from the caller's generator. A generator may also be a list with
one generator per sample: sample b then draws only from generator b, in the same order, so it gets the same tokens
as a batch of one with that generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .schedules import ScheduleLike, mask_ratio, tokens_to_mask

Generators = torch.Generator | Sequence[torch.Generator] | None


def _per_sample(generator: Generators, batch: int) -> list[torch.Generator] | None:
    """A list of `batch` generators, or None when one generator (or the global one) serves the whole batch."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    generators = list(generator)
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}; pass one per image or a single one")
    return generators


def _draw_codes(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs (N, L, K) -> one code per position (N, L), drawn on the generator's device (fp32 on a CPU)."""
    draw = probs if generator is None else probs.to(generator.device)
    if draw.device.type == "cpu" and draw.dtype != torch.float32:
        draw = draw.float()  # torch.multinomial has no CPU half kernel
    codes = torch.multinomial(draw.reshape(-1, probs.shape[-1]), 1, generator=generator)  # (N*L, 1)
    return codes.to(probs.device).view(probs.shape[:-1])


def draw_tokens(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Sample one code per position: probs (B, L, K) -> ids (B, L) long, with torch.multinomial."""
    generators = _per_sample(generator, probs.shape[0])
    if generators is None:
        return _draw_codes(probs, generator)
    return torch.cat([_draw_codes(probs[b : b + 1], g) for b, g in enumerate(generators)])


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = like.device if generator is None else generator.device
    return torch.zeros_like(like, device=device).uniform_(0, 1, generator=generator).to(like.device)


def uniform_noise(like: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """U(0, 1) noise of `like`'s shape and dtype, drawn on the generator's device; with a list of generators, row b
    of the batch (dim 0) from generator b."""
    generators = _per_sample(generator, like.shape[0])
    if generators is None:
        return _uniform(like, generator)
    return torch.cat([_uniform(like[b : b + 1], g) for b, g in enumerate(generators)])


def gumbel_noise(like: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard Gumbel noise of `like`'s shape and dtype: -log(-log(u)), u ~ U(0, 1), both logs clamped at 1e-20."""
    u = uniform_noise(like, generator)
    return -torch.log((-torch.log(u.clamp(1e-20))).clamp(1e-20))


def lowest_confidence(
    token_probs: torch.Tensor,  # (B, L) probability of each position's token
    count: torch.Tensor,  # (B, 1) long: how many to select per sample
    temperature: torch.Tensor | float,  # re-masking temperature (0-dim tensor or number)
    generator: Generators = None,
) -> torch.Tensor:  # (B, L) bool
    """The `count` positions of lowest confidence log p + temperature * Gumbel: those strictly below the count-th
    smallest confidence (ties at the cut are kept, as the reference)."""
    confidence = torch.log(token_probs.clamp(1e-20)) + temperature * gumbel_noise(token_probs, generator)
    cut = torch.sort(confidence, dim=-1).values.gather(1, count)  # (B, 1)
    return confidence < cut


def token_probabilities(logits: torch.Tensor, sampling_temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / sampling_temperature) over the codebook (last dim). Temperature 1 is the reference."""
    if sampling_temperature != 1.0:
        logits = logits / sampling_temperature
    return logits.softmax(dim=-1)


def classifier_free_guidance(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """logits (2B, ...) = [unconditional; conditional] -> uncond + scale * (cond - uncond), (B, ...)."""
    uncond, cond = logits.chunk(2)
    return uncond + scale * (cond - uncond)


def scheduled_count(
    unknown: torch.Tensor,  # (B, L) bool: masked before this step
    step: int,
    num_steps: int,
    schedule: ScheduleLike = "cosine",
    starting_mask_ratio: float | torch.Tensor = 1.0,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:  # (B, 1) long
    """How many tokens stay masked after step `step` (not the last): floor(num_tokens * starting_mask_ratio *
    schedule((step + 1) / num_steps)), bounded as in `tokens_to_mask`; num_tokens defaults to the length L."""
    ratio = starting_mask_ratio * mask_ratio(schedule, step, num_steps, device=unknown.device)
    return tokens_to_mask(ratio, unknown.shape[1] if num_tokens is None else num_tokens, unknown.sum(dim=-1))


def decode_step(
    logits: torch.Tensor,  # (B, L, K) over the codebook
    tokens: torch.Tensor,  # (B, L) long; mask_token_id where unknown
    step: int,  # 0-based index of this step among num_steps
    num_steps: int,
    *,
    mask_token_id: int,
    schedule: ScheduleLike = "cosine",
    remask_temperature: torch.Tensor | float = 1.0,  # this step's Gumbel temperature
    generator: Generators = None,
    starting_mask_ratio: float | torch.Tensor = 1.0,
    num_tokens: int | torch.Tensor | None = None,
    sampling_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # (next tokens (B, L), predicted full sample (B, L))
    """One decoding step. After it, floor(num_tokens * starting_mask_ratio * schedule((step + 1) / num_steps))
    tokens stay masked (bounded as in `tokens_to_mask`); none after the last step.

    `num_tokens` is what the schedule is a fraction of: the sequence length L by default (the reference), or a
    (B, 1) tensor of each sample's initially masked count (then pass starting_mask_ratio=1).
    `sampling_temperature` divides the logits before the token draw; `remask_temperature` scales the Gumbel noise of
    the re-masking. With the defaults (1, and the reference's annealed temperatures) this is the reference's step."""
    unknown = tokens == mask_token_id  # (B, L)
    probs = token_probabilities(logits, sampling_temperature)  # (B, L, K)
    predicted = torch.where(unknown, draw_tokens(probs, generator), tokens)
    if step == num_steps - 1:
        return predicted, predicted

    count = scheduled_count(unknown, step, num_steps, schedule, starting_mask_ratio, num_tokens)
    token_probs = probs.gather(-1, predicted[..., None])[..., 0]  # (B, L)
    # tokens known before this step are never masked again
    token_probs = torch.where(unknown, token_probs, torch.finfo(token_probs.dtype).max)
    remask = lowest_confidence(token_probs, count, remask_temperature, generator)
    return torch.where(remask, mask_token_id, predicted), predicted


def random_mask(
    tokens: torch.Tensor,  # (B, ...) long
    ratio: torch.Tensor | float,  # probability of masking each token
    mask_token_id: int,
    generator: Generators = None,
) -> torch.Tensor:
    """Mask each token independently with probability `ratio` (u < ratio, u ~ U(0, 1) of the tokens' shape): the
    reference's image-to-image noising, a Bernoulli draw, not an exact count."""
    generators = _per_sample(generator, tokens.shape[0])
    if generators is None:
        device = tokens.device if generator is None else generator.device
        u = torch.rand(tokens.shape, device=device, generator=generator).to(tokens.device)
    else:
        u = torch.cat(
            [torch.rand((1, *tokens.shape[1:]), device=g.device, generator=g).to(tokens.device) for g in generators]
        )
    return torch.where(u < ratio, mask_token_id, tokens)
