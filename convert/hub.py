"""Finding a pipeline folder: a local path, or a Hugging Face hub id fetched (or found in the local cache) through
`huggingface_hub`, downloading only the files a pipeline needs.

Offline use: with `HF_HUB_OFFLINE=1`, or when the hub cannot be reached, the snapshot already in the local hub cache
(`HF_HUB_CACHE`, default ~/.cache/huggingface/hub) is used; if it is not there the error says what to download and how.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from .safe_load import CheckpointError

# owner/name, as the hub spells repository ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def pipeline_patterns(variant: str | None, sharded: bool = True) -> list[str]:
    """The files of a published aMUSEd pipeline repository that loading needs (one weight precision only).
    `sharded` adds the names of split weight files (the published repositories have none)."""
    if variant:
        weights = [f"*/*.{variant}.safetensors"] + (
            [f"*/*.safetensors.index.{variant}.json", f"*/*.{variant}.safetensors.index.json"] if sharded else []
        )
    else:
        weights = ["*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]
        if sharded:
            weights += [
                "*/*.safetensors.index.json",
                "*/diffusion_pytorch_model-*.safetensors",
                "*/model-*.safetensors",
            ]
    return ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer/*"] + weights


def _offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str | None:
    # read at call time (huggingface_hub reads the environment once, at import)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def download_instructions(repo_id: str, variant: str | None, revision: str | None = None) -> str:
    include = " ".join(f"'{p}'" for p in pipeline_patterns(variant, sharded=False))
    rev = f" --revision {revision}" if revision else ""
    return (
        f"on a machine with network, run\n    hf download {repo_id}{rev} --include {include}\n"
        f"(older huggingface_hub: `huggingface-cli download` with the same arguments), then copy the hub cache "
        f"(~/.cache/huggingface/hub, or $HF_HUB_CACHE) to this machine, or pass `--local-dir DIR` to the download "
        f"and give DIR as the path instead of the hub id"
    )


def resolve_pipeline_dir(
    path_or_id: str | os.PathLike, variant: str | None = None, revision: str | None = None
) -> Path:
    """A local folder for `path_or_id`: the path itself when it exists, otherwise the hub snapshot of that id."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: expected a folder (a pipeline, one of ours or an open-muse checkpoint), got a file"
            )
        return path
    repo_id = str(path_or_id)
    if not _HUB_ID.match(repo_id):
        raise CheckpointError(f"{repo_id}: no such folder, and not a hub id of the form owner/name")
    offline = _offline()
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=_cache_dir(),
            allow_patterns=pipeline_patterns(variant),
            local_files_only=offline,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"{repo_id}: no such repository or revision on the hub ({type(e).__name__})") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
        raise CheckpointError(
            f"{repo_id}: not in the local hub cache ({_cache_dir() or 'the default cache'}) and {why}. To use it, "
            + download_instructions(repo_id, variant, revision)
        ) from None
    except OSError as e:  # connection errors without a cached snapshot
        raise CheckpointError(
            f"{repo_id}: cannot download it ({e.__class__.__name__}: {e}). "
            + download_instructions(repo_id, variant, revision)
        ) from None
    return Path(folder)
