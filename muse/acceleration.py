"""Faster execution of the U-ViT inside the decoding loop, without changing what it computes.

`CUDAGraphForward` records the U-ViT's `forward_prepared` once per input shape in a CUDA graph and replays it at every
step: the ~1,000 kernel launches of a forward become one, which is what dominates small-batch GPU decoding (the
measured effect is in benchmarks/results/gpu_quick_h100.md). Same kernels, same inputs: the logits equal the eager
forward's.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


class CUDAGraphForward:
    """Callable like `UViT.forward_prepared(ids, conditioning)`; each new combination of input shapes is captured
    once (after two warm-up runs on a side stream), then replayed with the inputs copied into the graph's static
    buffers. The conditioning's tensors are copied only when a different `Conditioning` object comes in (once per
    pipeline call): do not modify a conditioning's tensors in place between calls. The returned logits live in the
    graph's output buffer and are overwritten by the next call: use them before calling again (the decoding loop
    does)."""

    def __init__(self, model):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {model.device}")
        self.forward = model.forward_prepared  # the eager method, bound before anyone patches it
        self.graphs: dict[
            tuple, list
        ] = {}  # key -> [graph, static ids, static conditioning tensors, output, the conditioning they hold]
        self._cond = None  # the last conditioning seen, its tensors and their shapes
        self._leaves: list[torch.Tensor] = []
        self._spec = None
        self._cond_key: tuple = ()

    def __call__(self, ids: torch.Tensor, cond) -> torch.Tensor:
        if cond is not self._cond:
            self._leaves, self._spec = tree_flatten(cond)
            self._cond, self._cond_key = cond, tuple((tuple(t.shape), t.dtype) for t in self._leaves)
        key = (tuple(ids.shape), ids.dtype, self._cond_key)
        if key not in self.graphs:
            self.graphs[key] = self._capture(ids)
        entry = self.graphs[key]
        graph, static_ids, static_leaves, out, bound = entry
        static_ids.copy_(ids)
        if bound is not cond:  # a new conditioning: copy it in once, keep it bound for the following steps
            for dst, src in zip(static_leaves, self._leaves):
                dst.copy_(src)
            entry[4] = cond
        graph.replay()
        return out

    @torch.no_grad()
    def _capture(self, ids: torch.Tensor) -> list:
        static_ids = ids.clone()
        static_leaves = [t.clone() for t in self._leaves]
        static_cond = tree_unflatten(static_leaves, self._spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (allocator, cuBLAS/cuDNN plans) off the capture
            for _ in range(2):
                self.forward(static_ids, static_cond)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.forward(static_ids, static_cond)
        return [graph, static_ids, static_leaves, out, self._cond]
