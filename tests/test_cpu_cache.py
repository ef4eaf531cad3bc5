"""The CPU caching allocator (train/cpu_cache.py): freed blocks are handed out again by size class, values are
untouched, leaving puts torch's own allocator back and frees what is idle, no compiler means torch's own allocator,
and a training run on it is the run on torch's own, loss for loss and weight for weight."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_loop import config, make_images, tiny_components, tokenizer  # noqa: F401 (a fixture)
from train import cpu_cache
from train.loop import train

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler: the allocator cannot build"
)
MiB = 1 << 20


@needs_compiler
def test_a_freed_block_is_handed_to_the_next_request_of_its_size_class():
    with cpu_cache.caching() as on:
        assert on
        before = cpu_cache.stats()
        a = torch.empty(MiB // 4)  # 1 MiB of fp32
        ptr = a.data_ptr()
        assert cpu_cache.stats().in_use == before.in_use + MiB
        del a
        assert cpu_cache.stats().in_use == before.in_use
        b = torch.empty(MiB // 4 - 1000)  # a little smaller: the same class (eight per power of two)
        assert b.data_ptr() == ptr
        assert cpu_cache.stats().reserved == before.reserved + MiB  # no new block
        c = torch.empty(3 * MiB // 4)  # another class: a new block
        assert c.data_ptr() != ptr and cpu_cache.stats().reserved == before.reserved + 4 * MiB
        small = torch.empty(100)  # below 64 KiB: torch's own allocation, not counted
        assert cpu_cache.stats().in_use == before.in_use + 4 * MiB
        del b, c, small
        # an idle block serves a request up to a quarter smaller (sizes that vary from step to step share blocks)
        d = torch.empty(int(0.81 * MiB) // 4)
        assert d.data_ptr() == ptr and cpu_cache.stats().reserved == before.reserved + 4 * MiB
        e = torch.empty(MiB // 8)  # half of it: a block of its own
        assert e.data_ptr() != ptr and cpu_cache.stats().reserved == before.reserved + 4 * MiB + MiB // 2
        del d, e


@needs_compiler
def test_values_are_those_of_torch_own_allocator():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 500, generator=g), torch.randn(500, 400, generator=g)
    expected = torch.nn.functional.gelu(x @ w).softmax(-1)
    with cpu_cache.caching():
        for _ in range(3):  # the later rounds reuse the first one's blocks
            got = torch.nn.functional.gelu(x @ w).softmax(-1)
            assert torch.equal(got, expected)
            del got


@needs_compiler
def test_leaving_puts_torch_allocator_back_and_frees_the_idle_blocks():
    base = cpu_cache.stats().in_use  # blocks still alive from earlier users in this process (caches, say)
    with cpu_cache.caching():
        kept = torch.ones(MiB)  # 4 MiB, alive past the block
        dropped = torch.ones(MiB)
        del dropped
        assert cpu_cache.stats().reserved >= base + 8 * MiB
    after = cpu_cache.stats()
    assert after.reserved == after.in_use == base + 4 * MiB  # the idle block is freed, the live one is still held
    outside = torch.ones(MiB)  # torch's own allocator again: not counted
    assert cpu_cache.stats().in_use == base + 4 * MiB
    assert kept.sum().item() == MiB  # the block held across the exit is intact
    del kept
    assert cpu_cache.stats().reserved == base  # freed, not cached, once caching is off
    del outside


@needs_compiler
def test_nested_blocks_keep_caching_until_the_outer_one_ends():
    with cpu_cache.caching():
        with cpu_cache.caching() as inner:
            assert inner
        held = cpu_cache.stats().in_use
        x = torch.empty(MiB)  # still from the caching allocator after the inner block ended
        assert cpu_cache.stats().in_use == held + 4 * MiB
        del x
    y = torch.empty(MiB)  # the outer block ended: torch's own
    assert cpu_cache.stats().in_use == held
    del y


def test_without_a_compiler_torch_allocator_is_used(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_cache, "_lib", None)  # as if never loaded in this process
    monkeypatch.setenv("MUSE_CACHE", str(tmp_path))  # no cached build to fall back on
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with cpu_cache.caching() as on:
        assert not on
        assert torch.ones(MiB).sum().item() == MiB
    assert not cpu_cache.available()
    monkeypatch.setattr(cpu_cache, "_lib", None)  # the next user builds it again


@needs_compiler
def test_training_on_the_caching_allocator_is_training_on_torch_own(tmp_path, tokenizer, monkeypatch):  # noqa: F811
    """The same run twice, the caching allocator on (the default on a CPU) and off: the same losses and the same
    trained weights, exactly."""
    used, original = [], cpu_cache.caching

    @contextlib.contextmanager
    def recorded(enabled: bool = True):
        with original(enabled) as on:
            used.append(on)
            yield on

    monkeypatch.setattr(cpu_cache, "caching", recorded)
    images = make_images(tmp_path / "img")
    runs = {}
    for on in (True, False):
        cfg = config(tmp_path / str(on), images, max_train_steps=6, cpu_caching_allocator=on)
        runs[on] = (train(cfg, tiny_components(tokenizer)), Path(cfg.output_dir))
    assert used == [True, False]
    assert runs[True][0].losses == runs[False][0].losses
    weights = [load_file(out / "transformer" / "diffusion_pytorch_model.safetensors") for _, out in runs.values()]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert cpu_cache.stats().reserved == 0 or cpu_cache.stats().reserved == cpu_cache.stats().in_use
