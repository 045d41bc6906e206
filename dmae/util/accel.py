"""Speed knobs that never change a result: torch.compile with an eager fallback, a batch size that fills memory."""

from __future__ import annotations

import warnings
from copy import deepcopy

import torch
from torch import nn

from dmae.util.errors import UserError
from dmae.util.precision import autocast


class Compiled(nn.Module):
    """`module` run through torch.compile; if compiling fails (no C++ compiler, an unsupported op, ...) it warns
    once and runs eagerly from then on.

    `options` go to torch.compile. The wrapped module stays the only registered submodule, so parameters, state
    dict, eval() and the device are the module's own.
    """

    def __init__(self, module: nn.Module, **options):
        super().__init__()
        self.module = module
        self._compiled = [torch.compile(module, **options)]  # a list, so it is not registered a second time

    def forward(self, *args, **kwargs):
        if self._compiled:
            try:
                return self._compiled[0](*args, **kwargs)
            except Exception as exc:  # compile failures come as many exception types
                warnings.warn(f"torch.compile failed, running eagerly: {type(exc).__name__}: {exc}",
                              RuntimeWarning, stacklevel=2)
                self._compiled.clear()
        return self.module(*args, **kwargs)


def compile_for_inference(module: nn.Module, cuda_graphs: bool = False) -> Compiled:
    """`module` compiled for inference: inductor's freezing folds the weights in as constants (pre-packed for
    oneDNN on CPU, cast once under bf16 autocast), so they must not change afterwards. cuda_graphs replays each
    batch shape as one CUDA graph."""
    options = {"freezing": True}
    if cuda_graphs:
        options["triton.cudagraphs"] = True
    return Compiled(module, options=options)


def inference_copy(module: nn.Module, precision: str) -> nn.Module:
    """`module` itself in fp32; in bf16 a frozen copy whose Linear and Conv weights and biases are bf16 already.

    Under bf16 autocast those layers run in bf16 anyway: autocast rounds fp32 weights to bf16 on every forward
    (costly in inference, where its cast cache is off), and rounding once ahead gives the same numbers. Norms,
    embeddings and everything else stay as they are, so the results equal plain autocast's.
    """
    if precision != "bf16":
        return module
    copy = deepcopy(module).eval().requires_grad_(False)
    for layer in copy.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            layer.to(torch.bfloat16)
    return copy


def largest_batch(model: nn.Module, example: torch.Tensor, precision: str = "fp32", *, limit: int) -> int:
    """The largest power of two <= limit whose inference forward on copies of `example` [C, H, W] fits in CUDA
    memory (the batch size that keeps the GPU busiest). Off CUDA it returns limit: host memory is not what bounds
    throughput there.
    """
    device = example.device
    if device.type != "cuda":
        return limit
    best, size = 0, 1
    while size <= limit:
        try:
            with torch.inference_mode(), autocast(device, precision):
                model(example.expand(size, *example.shape).clone())
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        best, size = size, size * 2
    if not best:
        raise UserError(f"a batch of one {tuple(example.shape)} image does not fit in {device} memory")
    return best
