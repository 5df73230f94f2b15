"""Small shared builders for the engine tests."""
import torch
from torch import nn

from revnet_zero import AdditiveCoupling, AffineCoupling, BaseCoupling


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: a stand-in for attention/FFN sub-functions."""

    def __init__(self, d, hidden=37, mult=1, p=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Dropout(p),
                                 nn.Linear(hidden, d * mult))

    def forward(self, x, **_):
        return self.net(x)


class ShiftCoupling(BaseCoupling):
    """A user coupling that only gives forward and inverse (a custom coupling as a user would write one)."""

    def __init__(self, d):
        super().__init__()
        self.mlp, self.gate = nn.Linear(d, d), nn.Linear(d, d)

    def transform(self, x):
        return self.mlp(x) * torch.sigmoid(self.gate(x))

    def forward(self, x1, x2):
        return x1, x2 + self.transform(x1)

    def inverse(self, y1, y2):
        return y1, y2 - self.transform(y1)


def coupling(kind, d, p=0.0, hidden=37):
    if kind == "additive":
        return AdditiveCoupling(MLP(d, hidden, p=p), MLP(d, hidden, p=p))
    if kind == "affine":
        return AffineCoupling(MLP(d, hidden, mult=2, p=p), MLP(d, hidden, mult=2, p=p), scale_init=0.5)
    if kind == "custom":
        return ShiftCoupling(d)
    raise ValueError(kind)


def rel_err(a, b):
    """Relative error in the 2-norm, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def worst_rel_err(got: dict, want: dict) -> tuple[float, str]:
    """The largest ``rel_err`` over matching entries of two dicts of tensors, and its key."""
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    errs = {k: rel_err(got[k], want[k]) for k in want}
    k = max(errs, key=errs.get)
    return errs[k], k


def saved_bytes(fn):
    """Bytes of distinct storages saved for backward while running fn(), and fn's result."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
