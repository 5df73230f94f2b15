"""RMSNorm that returns its output in the matmul dtype and keeps only its input for backward.

``nn.RMSNorm`` on a float32 stream under bf16 autocast produces a float32 output that the next matmul
casts to bf16; autograd keeps both the float32 normalised tensor (for the weight's gradient) and the
bf16 copy, 6 bytes per element beside the stream. ``rms_norm_cast`` computes in float32 (float64 for
float64 input) a row chunk at a time, writes the low-precision output directly, and saves the input (the
stream, alive anyway) and one float32 per row; backward recomputes the normalised rows. Same arithmetic
as ``nn.RMSNorm`` in float32 (``x * rsqrt(mean(x^2) + eps) * w``), then one rounding to the output dtype.
On CUDA, where PyTorch's fused RMSNorm kernel keeps the same two tensors, that kernel is used (fewer
launches).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

ROWS = 16384   # rows per float32 chunk: bounds the temporaries at 4 * ROWS * D bytes each


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on, else ``x``'s."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def rms_norm_cast(x: Tensor, weight: Tensor, eps: float | None, dtype: torch.dtype) -> Tensor:
    """``nn.RMSNorm``'s ``x / rms(x) * weight`` over the last dim, computed in float32, returned in ``dtype``
    (``eps=None``: the machine epsilon of ``x``'s dtype, as ``nn.RMSNorm``)."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if x.shape[-1:] != weight.shape:
        raise ValueError(f"rms_norm_cast: weight {tuple(weight.shape)} must match the last dim of x "
                         f"{tuple(x.shape)}")
    if x.is_cuda and _fused_on_cuda(x.device, x.dtype):
        # one fused kernel each way; its autograd keeps x and the per-row rstd, and the float32
        # output dies at the cast
        return F.rms_norm(x, x.shape[-1:], weight.to(x.dtype), eps).to(dtype)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormCast.apply(x, weight, eps, dtype)
    return _forward(x, weight, eps, dtype)[0]


# (device, dtype) -> whether F.rms_norm runs the fused kernel there: a property of the installed
# PyTorch and the device, the same for every model, so one probe per device and dtype suffices.
_FUSED: dict[tuple[torch.device, torch.dtype], bool] = {}


def _fused_on_cuda(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``F.rms_norm`` on this CUDA device and dtype runs PyTorch's fused kernel (whose backward
    keeps only the input and rstd) rather than the composite that keeps the normalised float32 tensor."""
    key = (device, dtype)
    if key not in _FUSED:
        # with grad (the first call may come under no_grad) and behind identity saved-tensor hooks,
        # so an enclosing torch.utils.checkpoint does not count the probe's saved tensors (it would
        # then see a different number of them in its recompute)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            x = torch.ones(2, 8, device=device, dtype=dtype, requires_grad=True)
            y = F.rms_norm(x, (8,), torch.ones(8, device=device, dtype=dtype), 1e-5)
            _FUSED[key] = "fused" in type(y.grad_fn).__name__.lower()
    return _FUSED[key]


def _forward(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    D = x.shape[-1]
    xs = x.reshape(-1, D)
    out = torch.empty(xs.shape, dtype=dtype, device=x.device)
    acc = torch.promote_types(x.dtype, torch.float32)   # float32, or float64 for float64 input
    rstd = torch.empty(xs.shape[0], 1, dtype=acc, device=x.device)
    w = weight.to(acc)
    for s in range(0, xs.shape[0], ROWS):
        xc = xs[s:s + ROWS].to(acc)
        r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        rstd[s:s + ROWS] = r
        out[s:s + ROWS] = xc * r * w
    return out.view(x.shape), rstd


class _RMSNormCast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, dtype):
        out, rstd = _forward(x, weight, eps, dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        D = x.shape[-1]
        xs, gs = x.reshape(-1, D), dout.reshape(-1, D)
        dx = torch.empty(xs.shape, dtype=x.dtype, device=x.device) if need_x else None
        acc = rstd.dtype
        dw = torch.zeros(D, dtype=acc, device=x.device) if need_w else None
        w = weight.to(acc)
        for s in range(0, xs.shape[0], ROWS):
            r = rstd[s:s + ROWS]
            xhat = xs[s:s + ROWS].to(acc) * r
            g = gs[s:s + ROWS].to(acc)
            if need_w:
                dw += (g * xhat).sum(0)
            if need_x:
                g = g * w
                dx[s:s + ROWS] = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return (dx.view(x.shape) if need_x else None), (dw.to(weight.dtype) if need_w else None), None, None
