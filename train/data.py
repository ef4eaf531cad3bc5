"""Training data: image sources, the reference's preprocessing, a resumable global-batch sampler, pre-encoding.

An example is an image and its prompt. Sources (the reference script's three):
  - `ImageFolderSource`: the images of a folder; prompt = file name without extension, or the `file_name` ->
    prompt table of a `metadata.jsonl` / `metadata.csv` in the folder (the Hugging Face imagefolder convention);
  - `SingleImageSource`: one image (style training), prompt = its file stem;
  - `HFDatasetSource`: a Hugging Face dataset by hub name or local path, with image and prompt columns and an optional
    prompt prefix.
Preprocessing (the reference's): EXIF orientation, RGB, shorter side resized to the resolution (bilinear), a random
square crop, pixels in [0, 1]; micro-conditions [original width, original height, crop top, crop left, 6.0].

Randomness is tied to the sample, not to the worker: the sampler walks one endless stream of indices (a fresh
permutation per epoch, from the seed), and position p of the stream crops with a generator seeded from (seed, p).
A global batch is the next `world * batch` positions; each process takes its rows. So k processes see exactly the
examples one process with the k-times batch sees, and resuming at stream position p continues exactly.

An image that cannot be read is skipped: the next readable image of the source takes its place (so every batch is
full and every process stays in step), and its path is reported with the batch (`skipped`) to be counted.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AESTHETIC_SCORE = 6.0  # the fifth micro-condition, fixed by the reference at training and sampling time


# --- preprocessing ---------------------------------------------------------------------------------------------------


def _header_read(source) -> Image.Image:
    """A path, bytes, a {'bytes', 'path'} dict (datasets' undecoded image) or a PIL image -> a PIL image whose header
    alone is read (a PIL image is returned as it is)."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        return Image.open(source)
    raise TypeError(f"cannot read an image from {type(source).__name__}")


def image_size(source) -> tuple[int, int]:
    """(width, height) of what `open_image` reads, from the file's header (nothing decoded). EXIF orientation may
    swap the two; `has_one_crop` does not depend on the order."""
    image = _header_read(source)
    size = image.size
    if image is not source:
        image.close()
    return size


def open_image(source) -> Image.Image:
    """What `_header_read` takes -> a fully decoded RGB image, EXIF orientation applied. Raises on anything
    unreadable."""
    image = _header_read(source)
    image.load()
    image = ImageOps.exif_transpose(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image -> (pixels (3, size, size) float in [0, 1], micro_conds (5,) float32).
    The shorter side becomes `size` (bilinear), the longer keeps the aspect (truncated), then a uniform random crop."""
    orig_w, orig_h = image.size
    new_w, new_h = resized_size(orig_w, orig_h, size)
    if (new_w, new_h) != (orig_w, orig_h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top = int(torch.randint(0, new_h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, new_w - size + 1, (1,), generator=generator))
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    micro = torch.tensor([orig_w, orig_h, top, left, AESTHETIC_SCORE], dtype=torch.float32)
    return pixels, micro


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """The (width, height) an image is resized to before its crop: the shorter side `size`, the aspect kept."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def has_one_crop(width: int, height: int, size: int) -> bool:
    """True when an image of this size has a single `size` crop: every read of it gives the same pixels."""
    return resized_size(width, height, size) == (size, size)


def sample_generator(seed: int, position: int) -> torch.Generator:
    """The generator of stream position `position`: independent of workers and processes."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


# --- sources ---------------------------------------------------------------------------------------------------------


class Source:
    """A list of (image, prompt) that can be read by index; reading may fail (the caller skips)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def prompt(self, index: int) -> str:
        raise NotImplementedError

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def size(self, index: int) -> tuple[int, int]:
        """(width, height) of the image, read as cheaply as the source allows."""
        return self.image(index).size

    def name(self, index: int) -> str:
        """How to refer to an example in a log line (a path, or source:index)."""
        return f"{type(self).__name__}[{index}]"

    def describe(self) -> str:
        return f"{type(self).__name__} of {len(self)} examples"


class MetadataError(ValueError):
    """A captions file row that cannot be used: the message names the file and the line."""


class ImageFolderSource(Source):
    """The images of a folder, captioned by their file names or by a metadata file (`metadata.jsonl` / `.csv`, or
    the one given). Every metadata row must be readable, name an image of the folder once, and give a string
    caption: any other row is an error naming its file and line, unless `skip_invalid_metadata`, when each such row
    is skipped, logged and counted (`metadata_skipped`)."""

    def __init__(
        self,
        folder: str | Path,
        prompt_key: str | None = None,
        metadata: str | Path | None = None,
        skip_invalid_metadata: bool = False,
    ):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"--instance_data_dir {self.folder} is not a folder")
        self.paths = sorted(
            p
            for p in self.folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not self.paths:
            raise ValueError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {self.folder}")
        self.skip_invalid_metadata = skip_invalid_metadata
        self.metadata_skipped: list[str] = []  # "file:line: why" of each row left out
        self.captions = self._read_metadata(metadata, prompt_key or "text")
        if self.metadata_skipped:
            log.warning("%d metadata row(s) skipped (--skip_invalid_metadata)", len(self.metadata_skipped))
        uncaptioned = [p.name for p in self.paths if p.name not in self.captions]
        if self.captions and uncaptioned:
            log.warning(
                "%d image(s) have no metadata row and are captioned by their file names: %s",
                len(uncaptioned),
                uncaptioned[:5],
            )

    def _read_metadata(self, metadata, key: str) -> dict[str, str]:
        if metadata is None:
            metadata = next(
                (self.folder / n for n in ("metadata.jsonl", "metadata.csv") if (self.folder / n).is_file()), None
            )
        if metadata is None:
            return {}
        metadata = Path(metadata)
        if not metadata.is_file():
            raise FileNotFoundError(f"--instance_data_metadata {metadata} does not exist")
        if metadata.suffix == ".jsonl":
            rows = _jsonl_rows(metadata)
        elif metadata.suffix == ".csv":
            rows = _csv_rows(metadata)
        else:
            raise ValueError(f"metadata file {metadata} must be .jsonl or .csv")
        images = {p.name for p in self.paths}
        captions, first_line = {}, {}
        for line, row in rows:
            try:
                name, caption = _caption(row, key, images)
                if name in captions:
                    raise ValueError(f"a second row for {name!r} (the first is on line {first_line[name]})")
            except ValueError as e:
                self._invalid(f"{metadata}:{line}: {e}")
                continue
            captions[name], first_line[name] = caption, line
        return captions

    def _invalid(self, problem: str) -> None:
        """A metadata row that cannot be used: an error, or with skip_invalid_metadata a logged, counted skip."""
        if not self.skip_invalid_metadata:
            raise MetadataError(problem + " (pass --skip_invalid_metadata to skip such rows)")
        log.warning("skipping metadata row %s", problem)
        self.metadata_skipped.append(problem)

    def __len__(self) -> int:
        return len(self.paths)

    def prompt(self, index: int) -> str:
        path = self.paths[index]
        return self.captions.get(path.name, path.stem)

    def image(self, index: int) -> Image.Image:
        return open_image(self.paths[index])

    def size(self, index: int) -> tuple[int, int]:
        return image_size(self.paths[index])

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def describe(self) -> str:
        captions = f", {len(self.captions)} captions from metadata" if self.captions else ", prompts = file names"
        skipped = f", {len(self.metadata_skipped)} metadata rows skipped" if self.metadata_skipped else ""
        return f"image folder {self.folder} ({len(self)} images{captions}{skipped})"


def _jsonl_rows(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; a line that is not JSON raises."""
    rows = []
    for number, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            rows.append((number, json.loads(text)))
        except json.JSONDecodeError as e:
            rows.append((number, ValueError(f"not valid JSON ({e.msg} at column {e.colno})")))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, object]]:
    """(line number where the row starts, {column: value}) of each row of a CSV file with a header. Rows with more
    or fewer fields than the header are errors; so is a quote left open (strict parsing)."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise MetadataError(f"{path}:1: cannot parse the CSV header ({e})") from None
    rows, start = [], reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise MetadataError(f"{path}:{start}: cannot parse the CSV row ({e}; an unterminated quote?)") from None
        if fields:
            if len(fields) != len(header):
                rows.append((start, ValueError(f"{len(fields)} field(s), the header has {len(header)}")))
            else:
                rows.append((start, dict(zip(header, fields))))
        start = reader.line_num + 1
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not UTF-8 text ({e})") from None


def _caption(row, key: str, images: set[str]) -> tuple[str, str]:
    """(image file name, caption) of one parsed metadata row; ValueError saying what is wrong with it."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in ("file_name", key) if k not in row]
    if missing:
        raise ValueError(f"no {' or '.join(repr(k) for k in missing)} (the row has {sorted(row)})")
    file_name, caption = row["file_name"], row[key]
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"file_name must be a non-empty string, got {file_name!r}")
    if not isinstance(caption, str):
        raise ValueError(f"the caption {key!r} must be a string, got {caption!r}")
    name = Path(file_name).name
    if name not in images:
        raise ValueError(f"file_name {file_name!r} matches no image in the folder")
    return name, caption


class SingleImageSource(Source):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"--instance_data_image {self.path} does not exist")

    def __len__(self) -> int:
        return 1

    def prompt(self, index: int) -> str:
        return self.path.stem

    def image(self, index: int) -> Image.Image:
        return open_image(self.path)

    def size(self, index: int) -> tuple[int, int]:
        return image_size(self.path)

    def name(self, index: int) -> str:
        return str(self.path)

    def describe(self) -> str:
        return f"single image {self.path} (prompt {self.path.stem!r})"


class HFDatasetSource(Source):
    """A Hugging Face dataset split. Image columns are read undecoded and decoded here, so a broken image is skipped
    instead of raising inside `datasets`."""

    def __init__(
        self, name_or_path: str, image_key: str, prompt_key: str, prompt_prefix: str | None = None, split: str = "train"
    ):
        import datasets  # heavy (pyarrow, pandas): only for --instance_data_dataset

        self.label = name_or_path
        ds = self._load(name_or_path, split)
        missing = [k for k in (image_key, prompt_key) if k not in ds.column_names]
        if missing:
            raise ValueError(f"dataset {name_or_path} has no column(s) {missing}; its columns are {ds.column_names}")
        if isinstance(ds.features[image_key], datasets.Image):
            ds = ds.cast_column(image_key, datasets.Image(decode=False))
        self.ds, self.image_key, self.prompt_key, self.prefix = ds, image_key, prompt_key, prompt_prefix or ""

    @staticmethod
    def _load(name_or_path: str, split: str):
        import datasets  # heavy (pyarrow, pandas): only for --instance_data_dataset

        path = Path(name_or_path)
        if path.is_dir() and any(
            (path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(str(path))  # a dataset saved with save_to_disk
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {name_or_path} has no split {split!r}; it has {list(ds)}")
            ds = ds[split]
        return ds

    def __len__(self) -> int:
        return len(self.ds)

    def prompt(self, index: int) -> str:
        return self.prefix + str(self.ds[index][self.prompt_key])

    def image(self, index: int) -> Image.Image:
        return open_image(self.ds[index][self.image_key])

    def size(self, index: int) -> tuple[int, int]:
        return image_size(self.ds[index][self.image_key])

    def name(self, index: int) -> str:
        return f"{self.label}[{index}]"

    def describe(self) -> str:
        prefix = f", prompt prefix {self.prefix!r}" if self.prefix else ""
        return f"dataset {self.label} ({len(self)} rows, image {self.image_key!r}, prompt {self.prompt_key!r}{prefix})"


def build_source(cfg) -> Source:
    """The one source the config names (exactly one of the three data flags)."""
    given = [k for k in ("instance_data_dir", "instance_data_image", "instance_data_dataset") if getattr(cfg, k)]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one of --instance_data_dir, --instance_data_image, --instance_data_dataset (got {given or 'none'})"
        )
    if cfg.instance_data_metadata and not cfg.instance_data_dir:
        raise ValueError("--instance_data_metadata captions the images of --instance_data_dir; give that folder too")
    if cfg.instance_data_dir:
        return ImageFolderSource(
            cfg.instance_data_dir, cfg.prompt_key, cfg.instance_data_metadata, cfg.skip_invalid_metadata
        )
    if cfg.instance_data_image:
        return SingleImageSource(cfg.instance_data_image)
    if not (cfg.image_key and cfg.prompt_key):
        raise ValueError("--instance_data_dataset needs --image_key and --prompt_key")
    return HFDatasetSource(cfg.instance_data_dataset, cfg.image_key, cfg.prompt_key, cfg.prompt_prefix)


def check_readable(source: Source) -> None:
    """Raise unless the source holds an image that can be read: an empty or all-corrupt source fails here, before
    any model is loaded, not inside the data loader."""
    if len(source) == 0:
        raise ValueError(f"{source.describe()}: no examples to train on")
    first = None
    for i in range(len(source)):
        try:
            source.image(i)
            return
        except Exception as e:  # any decoding problem: try the next one
            first = first or f"{source.name(i)}: {type(e).__name__}: {e}"
    raise ValueError(f"none of the {len(source)} images of {source.describe()} can be read (the first: {first})")


# --- datasets: what the loader yields ----------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Items are indexed by (source index, stream position): {pixels (3, S, S), micro_conds (5,), prompt, skipped}."""

    def __init__(self, source: Source, resolution: int, seed: int):
        self.source, self.resolution, self.seed = source, resolution, seed

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int, generator: torch.Generator) -> dict | None:
        """One example, or None if its image cannot be read."""
        try:
            image = self.source.image(index)
        except Exception as e:  # any decoding problem: skip, never crash the run
            log.warning("skipping unreadable image %s: %s: %s", self.source.name(index), type(e).__name__, e)
            return None
        pixels, micro = resize_and_crop(image, self.resolution, generator)
        return {"pixels": pixels, "micro_conds": micro, "prompt": self.source.prompt(index)}

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        skipped = []
        for k in range(len(self.source)):  # the first readable image from `index` on takes its place
            i = (index + k) % len(self.source)
            item = self.read(i, sample_generator(self.seed, position))
            if item is not None:
                return {**item, "skipped": skipped}
            skipped.append(self.source.name(i))
        raise RuntimeError(f"none of the {len(self.source)} images of {self.source.describe()} can be read")


def collate(items: list[dict]) -> dict:
    out = {"skipped": [s for it in items for s in it["skipped"]]}
    for key in items[0]:
        if key == "skipped":
            continue
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class GlobalBatchSampler:
    """An endless stream of (index, position) lists: position p holds permutation_{p // n}[p % n], a fresh permutation
    of the n examples per epoch. Global batch k = positions [k G, (k + 1) G) with G = world * batch; this process
    takes rows [rank * batch, (rank + 1) * batch). `start` = the number of global batches already consumed."""

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.batch, self.seed, self.rank, self.world, self.start = n, batch, seed, rank, world, start
        self._epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[offset]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start
        while True:
            first = k * self.global_batch + self.rank * self.batch
            yield [(self.index_at(p), p) for p in range(first, first + self.batch)]
            k += 1


# --- pre-encoded data --------------------------------------------------------------------------------------------------


PRE_ENCODED_FILE = "pre_encoded.safetensors"


def pre_encoded_matches(directory: str | Path, fingerprint: str) -> bool:
    """True when `directory` holds pre-encoded data made from the same model, data and resolution."""
    file = Path(directory) / PRE_ENCODED_FILE
    if not file.is_file():
        return False
    with safe_open(str(file), framework="pt") as f:
        return (f.metadata() or {}).get("fingerprint") == fingerprint


class PreEncodedDataset(Dataset):
    """A dataset encoded once (`pre_encode`): VQ token ids, text conditioning and micro-conditions per example, and
    the empty prompt's conditioning (for conditioning dropout), in one safetensors file read lazily.
    Items: {ids (h, w) long, encoder_hidden_states (L, D), prompt_embeds (Dc,), micro_conds (5,), skipped: []}."""

    def __init__(self, directory: str | Path):
        self.file = Path(directory) / PRE_ENCODED_FILE
        if not self.file.is_file():
            raise FileNotFoundError(f"no pre-encoded data at {self.file}")
        with safe_open(str(self.file), framework="pt") as f:
            self.meta = dict(f.metadata() or {})
            self.empty_hidden = f.get_tensor("empty_encoder_hidden_states")
            self.empty_pooled = f.get_tensor("empty_prompt_embeds")
            self.n = f.get_slice("ids").get_shape()[0]
        self._handle = None

    def _f(self):
        if self._handle is None:  # opened lazily, once per worker process
            self._handle = safe_open(str(self.file), framework="pt")
        return self._handle

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, _ = key
        f = self._f()
        return {
            "ids": f.get_slice("ids")[index].long(),
            "encoder_hidden_states": f.get_slice("encoder_hidden_states")[index],
            "prompt_embeds": f.get_slice("prompt_embeds")[index],
            "micro_conds": f.get_slice("micro_conds")[index],
            "skipped": [],
        }


@torch.no_grad()
def pre_encode(
    dataset: ImageDataset,
    directory: str | Path,
    vqvae,
    encode_prompts,  # list[str] -> (encoder_hidden_states (B, L, D), prompt_embeds (B, Dc))
    fingerprint: str,
    batch_size: int = 8,
    store_dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> Path:
    """Encode every readable example once (one crop each, from the dataset's seed) and write them to `directory`.
    Unreadable images are left out and listed in the file's metadata. Written atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids, hidden, pooled, micro, skipped = [], [], [], [], []
    n = len(dataset)
    bar = tqdm(range(0, n, batch_size), desc="pre-encoding", disable=not progress)
    for start in bar:
        items = []
        for i in range(start, min(n, start + batch_size)):
            item = dataset.read(i, sample_generator(dataset.seed, i))
            if item is None:
                skipped.append(dataset.source.name(i))
            else:
                items.append(item)
        if not items:
            continue
        pixels = torch.stack([it["pixels"] for it in items]).to(vqvae.device, vqvae.dtype)
        ids.append(vqvae.encode(pixels).to(torch.int16).cpu())  # 8192 codes fit int16
        h, p = encode_prompts([it["prompt"] for it in items])
        hidden.append(h.to("cpu", store_dtype))
        pooled.append(p.to("cpu", store_dtype))
        micro.append(torch.stack([it["micro_conds"] for it in items]))
    if not ids:
        raise RuntimeError(f"none of the {n} images of {dataset.source.describe()} can be read")
    empty_h, empty_p = encode_prompts([""])
    tensors = {
        "ids": torch.cat(ids),
        "encoder_hidden_states": torch.cat(hidden),
        "prompt_embeds": torch.cat(pooled),
        "micro_conds": torch.cat(micro),
        "empty_encoder_hidden_states": empty_h[0].to("cpu", store_dtype).contiguous(),
        "empty_prompt_embeds": empty_p[0].to("cpu", store_dtype).contiguous(),
    }
    meta = {"fingerprint": fingerprint, "source": dataset.source.describe(), "skipped": json.dumps(skipped)}
    tmp = directory / (PRE_ENCODED_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(directory / PRE_ENCODED_FILE)
    if skipped:
        log.warning("pre-encoding skipped %d unreadable image(s): %s", len(skipped), skipped[:5])
    return directory / PRE_ENCODED_FILE


def fingerprint(parts: Sequence) -> str:
    """A short hash identifying what a pre-encoded cache was made from."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]
