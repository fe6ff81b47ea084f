"""One function captured in a CUDA graph for one input shape, replayed per call (the video path's
per-batch work and :meth:`rethinkcam_fast.CAMEngine.graphed`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class CapturedCall:
    """``fn(static_in)`` captured in a CUDA graph; calling it copies the input in and replays.

    ``fn`` must not synchronise with the host or copy host data to the device (a capture forbids
    both); it runs ``warmup`` times on a side stream first, so that Triton compiles, the allocator
    settles and lazily resolved state (e.g. an engine's default target layer) is set before the
    capture. The outputs are the graph's static tensors, overwritten by the next replay.
    """

    def __init__(self, fn: Callable[[Tensor], tuple[Tensor, ...]], example: Tensor, warmup: int = 2) -> None:
        with torch.cuda.device(example.device):
            self.static_in = example.clone()
            side = torch.cuda.Stream(device=example.device)
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(self.static_in)
            torch.cuda.current_stream(example.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # Captured on the side stream, which lives on the example's device: torch.cuda.graph's
            # default capture stream is one per process, made on whichever device was current at the
            # process's first capture, and entering it would make that device current (a capture on
            # cuda:1 after one on cuda:0 would record nothing of the work, which runs on cuda:1).
            with torch.cuda.graph(self.graph, stream=side):
                self.static_out = fn(self.static_in)

    def __call__(self, batch: Tensor) -> tuple[Tensor, ...]:
        self.static_in.copy_(batch, non_blocking=True)
        self.graph.replay()
        return self.static_out
