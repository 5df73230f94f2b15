"""Sequence-tiled MLPs for converted Hugging Face layers.

A decoder layer's MLP is position-wise, and at long context its intermediates are the largest
tensors of the layer: Llama-3-8B's gate, up and activated products are ``[S, 14336]`` each, 28 KB per
token in bf16, against 8 KB for the layer's input. ``tile_mlp(mlp, chunk)`` makes the MLP run in
tiles of ``chunk`` positions whenever it runs with grad in training: the forward computes each tile
without grad and keeps only the MLP's input; the backward recomputes one tile at a time with grad.
So no intermediate exists for more than one tile, at the price of one more MLP forward in backward.

The tiled forward is deterministic (the same tiles, kernels and, when dropout is active, the same
random state), so BDIA's rebuild, which recomputes the layer and needs the forward's output bit for
bit, works unchanged. Tiled and untiled results agree to floating-point rounding (the weight
gradients are summed over tiles).

The MLP module keeps its class, sub-modules and state_dict keys (``forward`` is overridden on the
instance), so peft adapters on its projections and ``save_pretrained`` work as before;
``untile_mlp`` removes the override.
"""
from __future__ import annotations

import contextlib
import types

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .._autograd import autocast_from as _autocast, autocast_state as _autocast_state
from .._autograd import restored_rng as _restored_rng, rng_state as _rng_state

_CHUNK = "_revnet_mlp_chunk"


def tile_mlp(mlp: nn.Module, chunk: int) -> nn.Module:
    """Run ``mlp`` (``[B, S, D] -> [B, S, D']``, position-wise) in tiles of ``chunk`` positions in
    training with grad; unchanged in eval, under ``torch.no_grad()`` and for ``S <= chunk``."""
    check_chunk(chunk)
    setattr(mlp, _CHUNK, chunk)
    mlp.forward = types.MethodType(_tiled_forward, mlp)  # a bound method: deepcopy rebinds it to the copy
    return mlp


def check_chunk(chunk) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"mlp_chunk_size must be None or a positive int (positions per MLP tile), got {chunk!r}")


def untile_mlp(mlp: nn.Module) -> nn.Module:
    """Undo ``tile_mlp``: the module's own ``forward`` again."""
    if hasattr(mlp, _CHUNK):
        delattr(mlp, _CHUNK)
        del mlp.forward
    return mlp


def _tiled_forward(self: nn.Module, x: Tensor, *args, **kwargs) -> Tensor:
    plain = type(self).forward
    chunk = getattr(self, _CHUNK)
    if args or kwargs or not (self.training and torch.is_grad_enabled()) or x.dim() != 3 or x.shape[1] <= chunk:
        return plain(self, x, *args, **kwargs)
    named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
    return _TiledMLP.apply(self, chunk, [n for n, _ in named], x, *[p for _, p in named])


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training for m in module.modules())


@contextlib.contextmanager
def _parameters_as(module: nn.Module, names: list[str], tensors: list[Tensor]):
    """Use ``tensors`` for the parameters ``names`` of ``module`` inside the block."""
    swapped = []
    for name, t in zip(names, tensors):
        prefix, _, leaf = name.rpartition(".")
        owner = module.get_submodule(prefix) if prefix else module
        swapped.append((owner, leaf, owner._parameters[leaf]))
        owner._parameters[leaf] = t
    try:
        yield
    finally:
        for owner, leaf, p in swapped:
            owner._parameters[leaf] = p


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mlp, chunk, names, x, *params):
        plain = type(mlp).forward
        ctx.mlp, ctx.chunk, ctx.names = mlp, chunk, names
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = _rng_state(x.device) if _has_dropout(mlp) else None
        ctx.save_for_backward(x, *params)
        out = None
        with torch.no_grad():
            for i in range(0, x.shape[1], chunk):
                y = plain(mlp, x[:, i:i + chunk].contiguous())  # a copy only for batch > 1
                if out is None:
                    out = y.new_empty((x.shape[0], x.shape[1], *y.shape[2:]))
                out[:, i:i + chunk] = y
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, *params = ctx.saved_tensors
        plain, chunk = type(ctx.mlp).forward, ctx.chunk
        need_x = ctx.needs_input_grad[3]
        need_p = list(ctx.needs_input_grad[4:])
        leaves = [p.detach().requires_grad_(need) for p, need in zip(params, need_p)]
        dx = torch.empty_like(x) if need_x else None
        pgrads: list[Tensor | None] = [None] * len(params)
        wrt = [p for p, need in zip(leaves, need_p) if need]
        with _restored_rng(ctx.rng, x.device), _parameters_as(ctx.mlp, ctx.names, leaves):
            for i in range(0, x.shape[1], chunk):
                with torch.enable_grad(), _autocast(ctx.autocast):
                    xt = x[:, i:i + chunk].detach().contiguous().requires_grad_(need_x)
                    y = plain(ctx.mlp, xt)
                gs = torch.autograd.grad(y, ([xt] if need_x else []) + wrt, dout[:, i:i + chunk], allow_unused=True)
                if need_x:
                    dx[:, i:i + chunk] = gs[0]
                    gs = gs[1:]
                it = iter(gs)
                for j, need in enumerate(need_p):
                    if need:
                        g = next(it)
                        if g is not None:
                            pgrads[j] = g if pgrads[j] is None else pgrads[j].add_(g)
        return (None, None, None, dx, *pgrads)
