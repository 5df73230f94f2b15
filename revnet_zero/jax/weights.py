"""Weights shared with PyTorch: ``ReversibleTransformer`` state dicts <-> ``ReversibleTransformerJAX`` params.

Names and layouts (L blocks; JAX stacks each block weight along a leading axis of length L; JAX linear
weights are ``[in, out]``, PyTorch's ``nn.Linear`` weights ``[out, in]``, so those are transposed):

=====================================================  =====================================
PyTorch (``state_dict``)                               JAX (``variables['params']``)
=====================================================  =====================================
``embed.weight [V, D]``                                ``embed [V, D]``
``blocks.blocks.{i}.coupling.f.norm.weight [D]``       ``blocks.attn.norm[i] [D]``
``blocks.blocks.{i}.coupling.f.wq.weight [D, D]``      ``blocks.attn.wq[i] [D, D]`` (transposed)
``...f.wk.weight / f.wv.weight [Hkv*hd, D]``           ``blocks.attn.wk[i] / wv[i] [D, Hkv*hd]`` (transposed)
``...f.wo.weight [D, D]``                              ``blocks.attn.wo[i] [D, D]`` (transposed)
``blocks.blocks.{i}.coupling.g.norm.weight [D]``       ``blocks.ffn.norm[i] [D]``
``...g.w_in.weight [2F, D]`` (rows: gate, then up)     ``blocks.ffn.w_in[i] [D, 2F]`` (transposed)
``...g.w_out.weight [D, F]``                           ``blocks.ffn.w_out[i] [F, D]`` (transposed)
``norm.weight [D]``                                    ``norm [D]``
``head.weight [V, D]`` (= ``embed.weight`` if tied)    ``head [D, V]`` (transposed; absent if tied)
=====================================================  =====================================
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..training.checkpoint import read_weights, save_weights
from .model import ReversibleTransformerJAX

ATTN = ("norm", "wq", "wk", "wv", "wo")
FFN = ("norm", "w_in", "w_out")


def _torch_names(model: ReversibleTransformerJAX) -> dict[str, tuple]:
    """PyTorch name -> (path in params, block index or None, transposed?)."""
    names = {"embed.weight": (("embed",), None, False), "norm.weight": (("norm",), None, False)}
    if not model.tie_embeddings:
        names["head.weight"] = (("head",), None, True)
    for i in range(model.num_layers):
        for sub, keys, tag in (("attn", ATTN, "f"), ("ffn", FFN, "g")):
            for k in keys:
                names[f"blocks.blocks.{i}.coupling.{tag}.{k}.weight"] = (("blocks", sub, k), i, k != "norm")
    return names


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _expected_shapes(model: ReversibleTransformerJAX) -> dict[str, tuple]:
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    out = {}
    for name, (path, i, t) in _torch_names(model).items():
        s = _get(shapes, path).shape
        s = s[1:] if i is not None else s
        out[name] = tuple(reversed(s)) if t else tuple(s)
    return out


def from_torch_state_dict(model: ReversibleTransformerJAX, state: dict) -> dict:
    """Flax variables ``{'params': ...}`` (float32) from a PyTorch ``ReversibleTransformer`` state dict
    (torch tensors or arrays). ValueError naming every tensor missing, extra or of another shape."""
    expected = _expected_shapes(model)
    if model.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "head.weight"}   # an alias of embed.weight
    arrays = {k: np.asarray(v.detach().float().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
              for k, v in state.items()}
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in arrays]
    problems += [f"unexpected {k} {arrays[k].shape}" for k in arrays if k not in expected]
    problems += [f"{k}: checkpoint has shape {arrays[k].shape}, model has {s}"
                 for k, s in expected.items() if k in arrays and arrays[k].shape != s]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError("the PyTorch weights do not fit this model: " + "; ".join(problems[:8]) + more)
    params: dict = {}
    stacked: dict = {}
    for name, (path, i, t) in _torch_names(model).items():
        a = arrays[name].T if t else arrays[name]
        if i is None:
            params[path[0]] = jnp.asarray(a)
        else:
            stacked.setdefault(path, [None] * model.num_layers)[i] = a
    params["blocks"] = {"attn": {}, "ffn": {}}
    for (_, sub, k), layers in stacked.items():
        params["blocks"][sub][k] = jnp.asarray(np.stack(layers))
    return {"params": params}


def to_torch_state_dict(model: ReversibleTransformerJAX, variables: dict) -> dict:
    """A PyTorch ``ReversibleTransformer`` state dict (float32 CPU tensors) from Flax variables."""
    import torch
    params = variables["params"]
    state = {}
    for name, (path, i, t) in _torch_names(model).items():
        a = np.asarray(jax.device_get(_get(params, path)), np.float32)
        a = a[i] if i is not None else a
        state[name] = torch.from_numpy(np.array(a.T if t else a, order="C"))   # a writable copy
    if model.tie_embeddings:
        state["head.weight"] = state["embed.weight"]   # the same tensor: written once, as an alias
    return state


def load_torch_weights(model: ReversibleTransformerJAX, path) -> dict:
    """Flax variables from a file written by ``revnet_zero.training.checkpoint.save_weights``
    (safetensors; a PyTorch ``ReversibleTransformer``'s weights)."""
    state, _ = read_weights(path)
    return from_torch_state_dict(model, state)


def save_torch_weights(model: ReversibleTransformerJAX, variables: dict, path, metadata: dict | None = None) -> None:
    """Write the variables as a PyTorch ``ReversibleTransformer`` weights file (safetensors, atomic),
    readable by ``revnet_zero.training.checkpoint.load_weights``."""
    save_weights(to_torch_state_dict(model, variables), path, metadata)
