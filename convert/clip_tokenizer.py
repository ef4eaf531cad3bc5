"""The CLIP tokenizer, built offline from the BPE merges that ship inside `open_clip_torch`.

The published aMUSEd folders carry the OpenAI CLIP tokenizer files (vocab.json, merges.txt, ...). When they are
absent we rebuild the same files: the vocabulary is the 256 byte symbols, the same with `</w>`, one entry per merge
(the first 48,894 merge lines), then `<|startoftext|>` (49406) and `<|endoftext|>` (49407). aMUSEd pads prompts to
77 tokens with the end-of-text token.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

NUM_MERGES = 49152 - 256 - 2  # 48,894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@lru_cache(maxsize=1)
def _merges() -> tuple[str, ...]:
    import open_clip  # optional here and heavy (it imports torchvision): only for the offline tokenizer

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"the CLIP BPE merges are missing from open_clip_torch (looked for {path})")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return tuple(lines[1 : NUM_MERGES + 1])


def clip_vocab() -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in _merges()] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab)}


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json for a transformers
    `CLIPTokenizer` into `directory` (the layout of a published `tokenizer/` folder)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(clip_vocab(), ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_merges()) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (d / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return d


def offline_clip_tokenizer():
    """A transformers CLIPTokenizer built from the bundled merges, padding with the end-of-text token."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        return CLIPTokenizer.from_pretrained(tmp)
