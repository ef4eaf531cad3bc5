"""`python -m train.generate_images`: step 1 of the style recipe (the reference's image-generation step): images of a
fixed list of prompts "<subject> in <style descriptor> style" from a base model plus a trained transformer
(`--load_transformer_from`, a `transformer/` folder or the output folder holding one) or LoRA adapter
(`--load_transformer_lora_from`, our or the peft format, a file or the output folder). One PNG per prompt, named
after the prompt; the user keeps the good ones for step 2.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from convert import uvit_from_diffusers
from convert.lora import load_lora_into
from convert.safe_load import read_safetensors
from muse import Pipeline
from uvit import UViT, UViTConfig

from .loop import DIFFUSERS_TRANSFORMER_WEIGHTS, OUR_TRANSFORMER_WEIGHTS

log = logging.getLogger("train.generate_images")

SUBJECTS = [
    "A chihuahua",
    "A tabby cat",
    "A portrait of chihuahua",
    "An apple on the table",
    "A banana on the table",
    "A church on the street",
    "A church in the mountain",
    "A church in the field",
    "A church on the beach",
    "A chihuahua walking on the street",
    "A tabby cat walking on the street",
    "A portrait of tabby cat",
    "An apple on the dish",
    "A banana on the dish",
    "A human walking on the street",
    "A temple on the street",
    "A temple in the mountain",
    "A temple in the field",
    "A temple on the beach",
    "A chihuahua walking in the forest",
    "A tabby cat walking in the forest",
    "A portrait of human face",
    "An apple on the ground",
    "A banana on the ground",
    "A human walking in the forest",
    "A cabin on the street",
    "A cabin in the mountain",
    "A cabin in the field",
    "A cabin on the beach",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.generate_images", description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None)
    p.add_argument("--style_descriptor", default="[V]")
    p.add_argument(
        "--load_transformer_from",
        default=None,
        help="a trained U-ViT: a transformer/ folder (diffusers layout, or ours for a U-ViT with a position embedding) or its parent",
    )
    p.add_argument(
        "--load_transformer_lora_from", default=None, help="LoRA adapters: a file or the training output folder"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--write_images_to", required=True)
    # ours
    p.add_argument("--prompts", nargs="*", default=None, help="(ours) prompts instead of the built-in list")
    p.add_argument("--seed", type=int, default=0, help="(ours)")
    p.add_argument("--num_inference_steps", type=int, default=12, help="(ours)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="(ours) weights dtype")
    return p


def load_transformer_into(transformer, path: str | Path) -> None:
    """Replace the U-ViT's weights by a trained one saved by `python -m train` (the diffusers layout, or ours for a
    U-ViT diffusers cannot hold: `train.loop.transformer_files`)."""
    folder = Path(path)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    config = json.loads((folder / "config.json").read_text())
    if (folder / OUR_TRANSFORMER_WEIGHTS).is_file():
        trained = UViT(UViTConfig.from_dict(config, strict=True))
        try:
            trained.load_state_dict(read_safetensors(folder / OUR_TRANSFORMER_WEIGHTS))
        except RuntimeError as e:  # missing, unexpected or misshapen tensors
            raise ValueError(f"{folder / OUR_TRANSFORMER_WEIGHTS} does not fit its config.json: {e}") from None
    else:
        trained = uvit_from_diffusers(config, load_file(str(folder / DIFFUSERS_TRANSFORMER_WEIGHTS)))
    if trained.config != transformer.config:
        raise ValueError(f"{folder} holds a U-ViT of another configuration than the base model's")
    with torch.no_grad():
        transformer.load_state_dict({k: v.to(transformer.dtype) for k, v in trained.state_dict().items()})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.dtype]
    prompts = args.prompts or [f"{s} in {args.style_descriptor} style" for s in SUBJECTS]
    if args.revision:
        log.warning("--revision is ignored: models load from a local folder or the local hub cache")
    pipe = Pipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype, variant=args.variant)
    if args.load_transformer_from:
        load_transformer_into(pipe.transformer, args.load_transformer_from)
    if args.load_transformer_lora_from:
        names = load_lora_into(pipe.transformer, args.load_transformer_lora_from, merge=True)
        log.info("loaded LoRA adapters on %d modules (merged)", len(names))
    pipe.to(device)
    out = Path(args.write_images_to)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        images = pipe(batch, generator=generator, num_inference_steps=args.num_inference_steps)
        for prompt, image in zip(batch, images):
            image.save(out / f"{prompt}.png")
    log.info("wrote %d images to %s", len(prompts), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
