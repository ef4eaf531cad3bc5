"""Prompt sets for evaluation: a text file, a JSON / JSONL / CSV file of captions, or a Hugging Face dataset column.

load_prompts("prompts.txt")                                   # one prompt per non-empty line
load_prompts("captions.json", column="caption")               # ["...", ...] or [{"caption": "..."}, ...]
load_prompts("captions.csv")                                  # a header row; the column is found by name
load_prompts("hf:nlphuji/mscoco_2014_5k_test_image_text_retrieval", column="caption", split="test")
load_prompts("/data/saved_dataset", column="text")            # a folder written by datasets' save_to_disk
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

# Column names tried, in this order, when none is given.
DEFAULT_COLUMNS = ("caption", "prompt", "text")
HF_PREFIX = "hf:"


def load_prompts(
    source: str | Path, column: str | None = None, split: str = "train", limit: int | None = None
) -> list[str]:
    """The prompts of `source`, in order, the first `limit` of them when given. Raises ValueError naming the
    problem when the source has no usable prompts (empty, missing column, non-text entries)."""
    source = str(source)
    if source.startswith(HF_PREFIX):
        prompts, where = _from_hub_dataset(source[len(HF_PREFIX) :], column, split), source
    else:
        path = Path(source)
        if path.is_dir():
            prompts, where = _from_saved_dataset(path, column, split), str(path)
        elif path.is_file():
            prompts, where = _from_file(path, column), str(path)
        else:
            raise FileNotFoundError(
                f"prompt source {source!r} is neither a file nor a folder; for a Hugging Face dataset write "
                f"'{HF_PREFIX}<name>' (with --prompt-column and --split)"
            )
    if limit is not None:
        if limit < 1:
            raise ValueError(f"the prompt limit must be >= 1, got {limit}")
        prompts = prompts[:limit]
    return _checked(prompts, where)


def _checked(prompts: list[Any], where: str) -> list[str]:
    if not prompts:
        raise ValueError(f"no prompts found in {where}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} of {where} is not a non-empty string: {p!r}")
    return [p.strip() for p in prompts]


def _pick_column(available: list[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in available:
            raise ValueError(f"{where} has no column {column!r}; its columns are {available}")
        return column
    for name in DEFAULT_COLUMNS:
        if name in available:
            return name
    raise ValueError(
        f"{where}: no column named one of {list(DEFAULT_COLUMNS)}; pick one of {available} with --prompt-column"
    )


def _from_file(path: Path, column: str | None) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            name = _pick_column(list(reader.fieldnames or []), column, str(path))
            return [row[name] for row in reader]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"prompts": [...]} or {"<column>": [...]}
            return list(data[_pick_column(list(data), column or ("prompts" if "prompts" in data else None), str(path))])
        return _from_records(data, column, str(path))
    if suffix == ".jsonl":
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return _from_records([json.loads(line) for line in lines], column, str(path))
    # anything else: plain text, one prompt per non-empty line
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_records(records: Any, column: str | None, where: str) -> list[Any]:
    """A list of strings, or a list of objects each holding the prompt under one column."""
    if not isinstance(records, list):
        raise ValueError(f"{where}: expected a list of captions or of objects, got {type(records).__name__}")
    if records and all(isinstance(r, dict) for r in records):
        name = _pick_column(list(records[0]), column, where)
        missing = [i for i, r in enumerate(records) if name not in r]
        if missing:
            raise ValueError(f"{where}: record {missing[0]} has no {name!r}")
        return [r[name] for r in records]
    return records


def _dataset_column(ds, column: str | None, where: str) -> list[Any]:
    name = _pick_column(list(ds.column_names), column, where)
    values = ds[name]
    # datasets such as COCO hold several captions per image: take the first
    return [v[0] if isinstance(v, list) and v else v for v in values]


def _from_hub_dataset(name: str, column: str | None, split: str) -> list[Any]:
    import datasets  # heavy (pyarrow, pandas): only when prompts come from a dataset

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # no network, no such dataset or split
        raise RuntimeError(
            f"could not load the Hugging Face dataset {name!r} (split {split!r}): {e}. Without network, save it "
            "elsewhere with datasets' save_to_disk and pass that folder, or export the captions to a text file"
        ) from e
    return _dataset_column(ds, column, f"{HF_PREFIX}{name}[{split}]")


def _from_saved_dataset(path: Path, column: str | None, split: str) -> list[Any]:
    import datasets  # heavy (pyarrow, pandas): only when prompts come from a dataset

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path} has no split {split!r}; its splits are {list(ds)}")
        ds = ds[split]
    return _dataset_column(ds, column, str(path))
