"""Text conditioning: prompts -> what the U-ViT reads, built exactly as the reference builds it.

Prompts are tokenized with the CLIP tokenizer, padded with the end-of-text token and truncated to 77 tokens, and
run through the CLIP text tower (transformers `CLIPTextModelWithProjection`, no attention mask). The U-ViT reads:
  - encoder_hidden_states (B, 77, D): the penultimate layer's hidden states (`hidden_states[-2]`, before the final
    LayerNorm);
  - prompt_embeds (B, D'): the projected pooled output (`text_embeds`), pooled at the first end-of-text token.
The names follow the reference pipelines' arguments, so precomputed embeddings pass straight through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class TextConditioning:
    """A batch of text conditions for the U-ViT (rows may be repeated or concatenated, see below)."""

    prompt_embeds: torch.Tensor  # (B, cond_embed_dim) pooled, projected
    encoder_hidden_states: torch.Tensor  # (B, L, encoder_hidden_size) penultimate layer

    def __post_init__(self):
        pe, ehs = self.prompt_embeds, self.encoder_hidden_states
        if pe.dim() != 2 or ehs.dim() != 3:
            raise ValueError(
                f"prompt_embeds must be (B, D) and encoder_hidden_states (B, L, D); got {tuple(pe.shape)} and {tuple(ehs.shape)}"
            )
        if pe.shape[0] != ehs.shape[0]:
            raise ValueError(
                f"prompt_embeds has {pe.shape[0]} rows but encoder_hidden_states has {ehs.shape[0]}; they must describe the same prompts"
            )

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def repeat(self, n: int) -> "TextConditioning":
        """Tile the batch n times: rows [p0, p1, p0, p1, ...] (the reference's order for num_images_per_prompt)."""
        return TextConditioning(self.prompt_embeds.repeat(n, 1), self.encoder_hidden_states.repeat(n, 1, 1))

    def to(self, device=None, dtype=None) -> "TextConditioning":
        return TextConditioning(self.prompt_embeds.to(device, dtype), self.encoder_hidden_states.to(device, dtype))

    @staticmethod
    def cat(first: "TextConditioning", second: "TextConditioning") -> "TextConditioning":
        """Rows of `first`, then rows of `second` (guidance batches are [negative; positive])."""
        return TextConditioning(
            torch.cat([first.prompt_embeds, second.prompt_embeds]),
            torch.cat([first.encoder_hidden_states, second.encoder_hidden_states]),
        )


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """prompts -> input ids (B, model_max_length), padded (with the tokenizer's pad token) and truncated, as the
    reference does; a prompt that loses words to the truncation is named in a warning (once per tokenizer)."""
    limit = tokenizer.model_max_length
    padded = tokenizer(prompts, padding="max_length", max_length=limit, truncation=False).input_ids
    if all(len(ids) == limit for ids in padded):  # every prompt fits: one tokenizer call, nothing cut
        return torch.tensor(padded)
    warn_truncated(tokenizer, prompts, [len(ids) for ids in padded], limit)
    return tokenizer(prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=limit).input_ids


def warn_truncated(tokenizer, prompts: list[str], lengths: list[int], limit: int) -> None:
    """Log a warning, the first time a tokenizer truncates, naming a prompt longer than `limit` tokens (start and end
    tokens included). A model folder may declare a short context (the embedded model reads 16 tokens), so the
    reference's silent truncation would drop words a user typed."""
    if getattr(tokenizer, "_muse_warned_truncation", False):
        return
    long = [(n, p) for n, p in zip(lengths, prompts) if n > limit]
    n, prompt = long[0]
    log.warning(
        "%d of %d prompts are longer than the model's text context of %d tokens and are cut to it, e.g. %r "
        "(%d tokens); the words past the context are not seen (warned once per tokenizer)",
        len(long), len(prompts), limit, prompt, n,
    )  # fmt: skip
    try:
        tokenizer._muse_warned_truncation = True
    except AttributeError:  # a tokenizer object that takes no attributes warns again next time
        pass


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str]) -> TextConditioning:
    """prompts -> TextConditioning on the text encoder's device and in its dtype; one encoder call for the batch."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("no prompts to encode (got an empty list)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__}")
    input_ids = tokenize(tokenizer, list(prompts)).to(text_encoder.device)
    out = text_encoder(input_ids, return_dict=True, output_hidden_states=True)
    return TextConditioning(out.text_embeds, out.hidden_states[-2])
