"""Session-wide fixtures: reference pipelines of random weights and their published folders, built once.

Full-size ones are expensive on a CPU (a 603M-parameter U-ViT); every test module that needs them shares the one
built here, and tests that use them carry the `full` marker."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers import reference_pipeline, save_published

# Two cores on the CI machine: let torch use them, and keep tests deterministic.
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def reference_pipelines():
    """kind -> a diffusers AmusedPipeline with random weights (built lazily, cached for the session)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = reference_pipeline(kind)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def published_dirs(reference_pipelines, tmp_path_factory):
    """kind -> a folder in the published layout (fp32 and fp16 variant weights) of `reference_pipelines(kind)`.

    A full-size folder takes about 5 GB of disk, and CI machines may have little to spare: only one is kept at a
    time. Asking for the other full size deletes it (rebuilding one from the cached pipeline takes seconds), and
    `pytest_collection_modifyitems` below orders tests so that this happens rarely."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            if kind.startswith("full"):
                for other in [k for k in cache if k.startswith("full")]:
                    shutil.rmtree(cache.pop(other))
            d = tmp_path_factory.mktemp(f"published-{kind}")
            cache[kind] = save_published(reference_pipelines(kind), d, fp16_variant=True)
        return cache[kind]

    return get


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by module-scoped fixture parameters
def pytest_collection_modifyitems(items):
    """Within each module, tests that load a full-512 published folder go first, so that the module leaves full-256
    on disk: the later modules ask for full-256 only (see `published_dirs`). A stable sort keeps every other order."""

    def uses_full_512(item) -> bool:
        callspec = getattr(item, "callspec", None)  # only parametrized tests have one
        values = callspec.params.values() if callspec is not None else ()
        return "published_dirs" in item.fixturenames and any(isinstance(v, str) and v == "full-512" for v in values)

    module_rank = {}
    for item in items:
        module_rank.setdefault(item.module, len(module_rank))
    items.sort(key=lambda item: (module_rank[item.module], not uses_full_512(item)))


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (use with `pytestmark = pytest.mark.usefixtures("one_thread")`): one thread beats
    two there, by far on a busy 2-core machine, since OpenMP hand-offs cost more than the work they split."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
