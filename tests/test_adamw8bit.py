"""The fused CPU update of 8-bit AdamW (train/adamw8bit.py) against bitsandbytes' own, bit for bit.

bitsandbytes is the oracle here: its CPU update (`torch.ops.bitsandbytes.optimizer_update_8bit_blockwise`) and its
optimizer class (`bitsandbytes.optim.AdamW8bit`) run on copies of the same tensors, and every parameter, quantized
moment and absmax must come out equal, not close."""

import shutil

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

from train import adamw8bit
from train.optim import build_optimizer

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler: the fused update cannot build"
)
QMAP1, QMAP2 = bnbF.create_dynamic_map(signed=True), bnbF.create_dynamic_map(signed=False)


def fresh_state(n: int) -> list[torch.Tensor]:
    """An 8-bit state as bitsandbytes starts it: both moments quantized to 0 with absmax 0."""
    blocks = -(-n // 256)
    return [
        torch.zeros(n, dtype=torch.uint8),
        torch.zeros(n, dtype=torch.uint8),
        torch.zeros(blocks),
        torch.zeros(blocks),
    ]


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor], what: str) -> None:
    for name, a, b in zip(("param", "state1", "state2", "absmax1", "absmax2"), ours, theirs):
        assert torch.equal(a, b), f"{what}: {name} differs in {int((a != b).sum())} of {a.numel()} elements"


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("n", [4096, 12_305, 100_000, 393_471])  # whole blocks; a partial last block; several slices
def test_fused_update_is_bitsandbytes_bit_for_bit(n, weight_decay, threads, monkeypatch):
    assert adamw8bit.available()
    monkeypatch.setattr(adamw8bit, "SLICE", 1 << 15)  # several slices even for the smaller sizes
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(n)
        p = torch.randn(n, generator=gen)
        start = p.clone()
        theirs, ours = [p, *fresh_state(n)], [p.clone(), *fresh_state(n)]
        for step, lr in enumerate((1e-3, 3e-4, 1e-3, 2e-3, 1e-4), start=1):
            g = torch.randn(n, generator=gen) * 10.0 ** -torch.randint(1, 4, (1,), generator=gen).item()
            torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
                "adam", g, theirs[0], theirs[1], theirs[2], 0.9, 0.999, 0.0, 0.0, 1e-8, step, lr,
                QMAP1, QMAP2, theirs[3], theirs[4], weight_decay, 1.0, False,
            )  # fmt: skip
            adamw8bit.fused_update(
                g, ours[0], ours[1], ours[2], 0.9, 0.999, 1e-8, step, lr, QMAP1, QMAP2, ours[3], ours[4], weight_decay
            )
            assert_same(ours, theirs, f"step {step}")
        assert (ours[0] != start).float().mean() > 0.99  # every step moved the parameters
    finally:
        torch.set_num_threads(previous)


class Net(nn.Module):
    """8-bit states (the two weights, 4096 elements or more) beside 32-bit ones (biases, the small weight)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(32, 64, 3)  # 18432 weights
        self.big = nn.Linear(300, 70)  # 21000: a partial last block of 256
        self.small = nn.Linear(70, 10)  # 700: under bitsandbytes' min_8bit_size, a 32-bit state


def run_steps(optimizer_cls, steps: int = 4) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    net = Net()
    decay = [net.conv.weight, net.big.weight, net.small.weight]
    no_decay = [net.conv.bias, net.big.bias, net.small.bias]
    opt = optimizer_cls(
        [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, eps=1e-8
    )
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in net.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    return net, opt.state_dict()


def assert_same_run(ours: tuple[nn.Module, dict], theirs: tuple[nn.Module, dict]) -> None:
    for (name, a), b in zip(ours[0].state_dict().items(), theirs[0].state_dict().values()):
        assert torch.equal(a, b), f"{name} differs"
    assert ours[1]["state"].keys() == theirs[1]["state"].keys()
    for index, state in theirs[1]["state"].items():
        assert_same_tree(ours[1]["state"][index], state, f"parameter {index}'s optimizer state")


def assert_same_tree(mine, theirs, where: str) -> None:
    """Equal nested dicts of tensors and numbers (bitsandbytes nests its quantized state in a dict)."""
    if isinstance(theirs, dict):
        assert isinstance(mine, dict) and mine.keys() == theirs.keys(), where
        for key in theirs:
            assert_same_tree(mine[key], theirs[key], f"{where}, {key!r}")
    elif torch.is_tensor(theirs):
        assert torch.is_tensor(mine) and torch.equal(mine, theirs), f"{where} differs"
    else:
        assert mine == theirs, f"{where} differs"


@needs_compiler
def test_optimizer_is_bitsandbytes_adamw8bit_and_fuses_its_8bit_updates(monkeypatch):
    calls = []
    fused = adamw8bit.fused_update
    monkeypatch.setattr(adamw8bit, "fused_update", lambda *a, **k: (calls.append(a[1].numel()), fused(*a, **k)))
    ours = run_steps(adamw8bit.AdamW8bit)
    assert sorted(set(calls)) == [18432, 21000] and len(calls) == 8  # the two 8-bit weights, every step
    assert_same_run(ours, run_steps(bnb.optim.AdamW8bit))
    assert isinstance(
        build_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], 1e-3, use_8bit=True), bnb.optim.AdamW8bit
    )


def test_without_the_fused_update_it_is_bitsandbytes_own(monkeypatch):
    monkeypatch.setattr(adamw8bit, "_lib", False)  # as when the C source did not build
    monkeypatch.setattr(adamw8bit, "fused_update", lambda *a, **k: pytest.fail("the fused update ran"))
    assert not adamw8bit.available()
    assert_same_run(run_steps(adamw8bit.AdamW8bit), run_steps(bnb.optim.AdamW8bit))


def test_a_failed_build_is_reported_and_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(adamw8bit, "_lib", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING", logger="train.adamw8bit"):
        assert not adamw8bit.available()
    assert "bitsandbytes' own CPU update" in caplog.text and "no-such-compiler" in caplog.text


@needs_compiler
@pytest.mark.parametrize(
    "broken, message",
    [
        (dict(g=torch.zeros(4096, dtype=torch.float16)), "grad must be a contiguous torch.float32"),
        (
            dict(state1=torch.zeros(4000, dtype=torch.uint8)),
            "state1 must be a contiguous torch.uint8 CPU tensor of 4096",
        ),
        (dict(absmax2=torch.zeros(15)), "absmax2 must be a contiguous torch.float32 CPU tensor of 16"),
        (dict(p=torch.zeros(64, 128).t()), "param must be a contiguous torch.float32 CPU tensor of 8192"),
    ],
    ids=["half grad", "short state", "short absmax", "transposed param"],
)
def test_fused_update_refuses_a_layout_it_would_misread(broken, message):
    n = broken["p"].numel() if "p" in broken else 4096
    blocks = -(-n // 256)
    args = dict(g=torch.zeros(n), p=torch.zeros(n), state1=torch.zeros(n, dtype=torch.uint8))
    args.update(state2=torch.zeros(n, dtype=torch.uint8), absmax1=torch.zeros(blocks), absmax2=torch.zeros(blocks))
    args.update(broken)
    with pytest.raises(ValueError, match=message):
        adamw8bit.fused_update(
            args["g"], args["p"], args["state1"], args["state2"], 0.9, 0.999, 1e-8, 1, 1e-3, QMAP1, QMAP2,
            args["absmax1"], args["absmax2"], 0.0,
        )  # fmt: skip
