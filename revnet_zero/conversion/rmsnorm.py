"""A memory-lean backward for Hugging Face's RMSNorms, with their forward bit for bit.

``LlamaRMSNorm`` (and the same code in Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, Phi-3) is written
as separate ops on a float32 copy of its input; autograd keeps that copy and, in backward, a handful
of float32 ``[S, D]`` temporaries at once (measured: the largest item at the peak of a converted
layer's backward). ``_RMSNorm`` runs the same ops in the same order, so its output equals the
module's bitwise, but keeps only the input and the per-row ``1/rms``, and its backward (the analytic
gradient, equal to autograd's to rounding) works in row tiles.

Gemma 2 and Gemma 3 normalise the same way but scale by ``1 + weight`` in float32 and cast last
(``(n · (1 + w)).to(dtype)``, where Llama casts ``n`` first and multiplies by ``w`` in the input's
dtype): different rounding, so a second Function, ``_OnePlusRMSNorm``, with its own backward.

``lean_rmsnorm(module)`` overrides ``forward`` on the instance (training with grad only; the
module, its weights and its state_dict are unchanged); ``plain_rmsnorm`` removes the override.
A norm class not listed below keeps its own forward and autograd's backward.
"""
from __future__ import annotations

import types

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# classes whose forward is exactly: float32 copy, pow(2).mean(-1), rsqrt(+eps), scale, cast back,
# times weight (eps in .variance_epsilon); tests/test_families.py pins each to its module bit for bit
KNOWN = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "MixtralRMSNorm",
         "Phi3RMSNorm")
# float32 copy, the same normalisation, times (1 + weight.float()), cast back last (eps in .eps)
ONE_PLUS = ("Gemma2RMSNorm", "Gemma3RMSNorm")
ROWS_ELEMENTS = 2 ** 24   # float32 elements per backward tile (64 MiB per temporary)
_FLAG = "_revnet_lean_rmsnorm"


def lean_rmsnorm(module: nn.Module) -> bool:
    """Give a known RMSNorm the lean backward; returns whether ``module`` is one."""
    name = type(module).__name__
    if not ((name in KNOWN and hasattr(module, "variance_epsilon")) or (name in ONE_PLUS and hasattr(module, "eps"))):
        return False
    setattr(module, _FLAG, True)
    module.forward = types.MethodType(_lean_forward, module)   # bound: deepcopy rebinds it to the copy
    return True


def plain_rmsnorm(module: nn.Module) -> None:
    if hasattr(module, _FLAG):
        delattr(module, _FLAG)
        del module.forward


def _lean_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, hidden_states)
    if type(self).__name__ in ONE_PLUS:
        return _OnePlusRMSNorm.apply(hidden_states, self.weight, float(self.eps))
    return _RMSNorm.apply(hidden_states, self.weight, float(self.variance_epsilon))


def _normed(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Hugging Face's op sequence: the float32 normalised rows (before the cast) and ``1/rms``."""
    h = x.to(torch.float32)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h * r, r


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        n, r = _normed(x, eps)
        ctx.save_for_backward(x, weight, r)
        return weight * n.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors[:2]

        def grads(n, d, need_w, need_x):                      # out = weight * cast(n)
            dw = (d * n.to(x.dtype)).to(torch.float32).sum(0) if need_w else None
            # autograd's casts: to cast(n)'s dtype, then up
            dn = (d * weight).to(x.dtype).to(torch.float32) if need_x else None
            return dw, dn
        return _tiled_backward(ctx, dout, grads)


class _OnePlusRMSNorm(torch.autograd.Function):
    """Gemma's ``(n · (1 + w.float())).to(x.dtype)`` with ``n`` the float32 normalised rows."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        n, r = _normed(x, eps)
        ctx.save_for_backward(x, weight, r)
        return (n * (1.0 + weight.float())).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        scale = 1.0 + ctx.saved_tensors[1].float()

        def grads(n, d, need_w, need_x):
            d = d.to(torch.float32)                           # the cast back's gradient, in float32
            return (d * n).sum(0) if need_w else None, d * scale if need_x else None
        return _tiled_backward(ctx, dout, grads)


def _tiled_backward(ctx, dout: Tensor, grads) -> tuple[Tensor | None, Tensor | None, None]:
    """Both norms' backward, ``ROWS_ELEMENTS`` at a time. ``grads(n, d, need_w, need_x)`` gives a tile's
    weight gradient (float32, summed over its rows) and the gradient at its float32 normalised rows ``n``
    (as forward, before any cast) from the output gradient ``d``, each only when needed (else None);
    the step through ``1/rms`` is the same for both norms."""
    x, weight, r = ctx.saved_tensors
    D = x.shape[-1]
    xs, rs, ds = x.reshape(-1, D), r.reshape(-1, 1), dout.reshape(-1, D)
    need_x, need_w = ctx.needs_input_grad[:2]
    dx = torch.empty_like(xs) if need_x else None
    dw = torch.zeros(D, dtype=torch.float32, device=x.device) if need_w else None
    step = max(1, ROWS_ELEMENTS // D)
    for i in range(0, xs.shape[0], step):
        n = xs[i:i + step].to(torch.float32) * rs[i:i + step]
        dw_tile, dn = grads(n, ds[i:i + step], need_w, need_x)
        if need_w:
            dw += dw_tile
        if need_x:
            dx[i:i + step] = rs[i:i + step] * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx.view_as(x) if need_x else None, dw.to(weight.dtype) if need_w else None, None
