"""Numerical stability of a reversible model, measured block by block on a real batch.

For each ``ReversibleBlock`` the analyzer takes the inputs the block really receives, runs the block
and its inverse, and measures how far the rebuilt inputs lie from the true ones (relative to the
streams' size), with float32 streams and with bfloat16 streams under bfloat16 autocast. The reversible
backward rebuilds every block's inputs this way, so this drift is the error it adds. It also records
each block's parameter-gradient norm and its output statistics, and can switch blocks whose drift is
above a bound to the ``store`` policy (plain autograd for those blocks: no rebuild, more memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..engine import ReversibleBlock


@dataclass
class BlockStability:
    name: str                              # the block's module name in the model
    drift_fp32: float                      # max |rebuilt - input| / max |input|, float32 streams
    drift_bf16: float                      # the same with bfloat16 streams under bfloat16 autocast
    grad_norm: float | None = None         # 2-norm of the block's parameter gradients (largest over passes)
    activation: dict[str, float] = field(default_factory=dict)   # output streams: mean, std, max_abs


@dataclass
class StabilityReport:
    """What ``StabilityAnalyzer.analyze`` measured. ``switched_to_store`` names the blocks whose drift
    exceeded ``drift_bound`` and now run with ``policy='store'``."""

    blocks: list[BlockStability]
    max_grad_norm: float | None            # largest block gradient norm (None: not checked)
    activation_stats: dict[str, dict[str, float]]   # block name -> mean / std / max_abs of its outputs
    max_drift_fp32: float
    max_drift_bf16: float
    drift_bound: float | None
    switched_to_store: list[str]
    num_forward_passes: int

    def summary(self) -> str:
        rows = ["block                  | drift fp32 | drift bf16 | grad norm | out std  | out max|x|",
                "-----------------------|------------|------------|-----------|----------|-----------"]
        for b in self.blocks:
            g = f"{b.grad_norm:9.3g}" if b.grad_norm is not None else "        -"
            a = b.activation
            rows.append(f"{b.name[-22:]:22s} | {b.drift_fp32:10.3g} | {b.drift_bf16:10.3g} | {g} | "
                        f"{a.get('std', float('nan')):8.3g} | {a.get('max_abs', float('nan')):9.3g}")
        if self.drift_bound is not None:
            rows.append(f"drift bound {self.drift_bound:g}: switched to 'store': {self.switched_to_store or 'none'}")
        return "\n".join(rows)

    def plot(self, path: str) -> None:
        """Drift per block (log scale) and gradient norm per block, as a PNG (needs matplotlib)."""
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError("the stability plot needs matplotlib: pip install 'revnet-zero[cli]'") from e
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        xs = list(range(len(self.blocks)))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
        for key, label in (("drift_fp32", "float32 streams"), ("drift_bf16", "bfloat16 streams")):
            a1.semilogy(xs, [max(getattr(b, key), 1e-12) for b in self.blocks], "o-", label=label)
        if self.drift_bound is not None:
            a1.axhline(self.drift_bound, color="k", ls="--", label="bound")
        a1.set(xlabel="block", ylabel="relative drift of rebuilt inputs", title="reconstruction drift")
        a1.legend()
        a2.semilogy(xs, [b.grad_norm or float("nan") for b in self.blocks], "o-")
        a2.set(xlabel="block", ylabel="parameter-gradient norm", title="gradient norms")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _default_loss(model, batch):
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(out, "loss", out)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("StabilityAnalyzer: the model's output has no scalar .loss; pass loss_fn(model, batch)")
    return loss


def _drift(block: ReversibleBlock, x1: Tensor, x2: Tensor, kwargs: dict, dtype: torch.dtype) -> float:
    """Relative max error of ``inverse(forward(x))`` with streams in ``dtype`` (bf16: under autocast)."""
    a1, a2 = x1.to(dtype), x2.to(dtype)
    low = dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad(), torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=low):
        r1, r2 = block.coupling.inverse(*block.coupling(a1, a2, **kwargs), **kwargs)
    err = max((r1.float() - a1.float()).abs().max().item(), (r2.float() - a2.float()).abs().max().item())
    scale = max(a1.float().abs().max().item(), a2.float().abs().max().item(), 1e-30)
    return err / scale


def _stats(y1: Tensor, y2: Tensor) -> dict[str, float]:
    y = torch.stack([y1.detach().float(), y2.detach().float()])
    return {"mean": y.mean().item(), "std": y.std().item(), "max_abs": y.abs().max().item()}


class StabilityAnalyzer:
    """Per-block reconstruction drift, gradient norms and activation statistics of a reversible model.

    ``loss_fn(model, batch) -> scalar`` (default: ``model(batch).loss``). Drift is measured in eval mode
    (dropout off: the engine replays dropout masks exactly, an inverse outside it would not); gradient
    norms and activation statistics in training mode, over ``num_forward_passes`` passes (more than
    one only matters with dropout).

    Example::

        analyzer = StabilityAnalyzer(model)
        report = analyzer.analyze(batch, num_forward_passes=2, drift_bound=1e-3)
        print(report.max_grad_norm, report.switched_to_store)
        print(report.summary())
    """

    def __init__(self, model: nn.Module, loss_fn=None):
        self.model = model
        self.blocks = {n: m for n, m in model.named_modules() if isinstance(m, ReversibleBlock)}
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} contains no ReversibleBlock to analyze")
        self.loss_fn = loss_fn or _default_loss

    def analyze(self, batch=None, num_forward_passes: int = 1, check_gradient_norm: bool = True,
                check_activation_stats: bool = True, drift_bound: float | None = None,
                bound_on: str = "fp32") -> StabilityReport:
        """Measure on ``batch`` (what the model takes: ``input_ids [B, S]`` or a dict). With ``drift_bound``,
        blocks whose drift (``bound_on``: 'fp32' or 'bf16' streams) exceeds it are set to ``'store'``."""
        if batch is None:
            raise ValueError("StabilityAnalyzer.analyze needs a batch of real inputs (e.g. input_ids [B, S]): "
                             "drift and gradients depend on the activations the model really sees")
        if isinstance(num_forward_passes, bool) or not isinstance(num_forward_passes, int) or num_forward_passes < 1:
            raise ValueError(f"num_forward_passes must be a positive int, got {num_forward_passes!r}")
        if bound_on not in ("fp32", "bf16"):
            raise ValueError(f"bound_on must be 'fp32' or 'bf16', got {bound_on!r}")
        if drift_bound is not None and not (isinstance(drift_bound, (int, float)) and drift_bound > 0):
            raise ValueError(f"drift_bound must be a positive number, got {drift_bound!r}")
        was_training = self.model.training
        try:
            results = self._drifts(batch)
            if check_gradient_norm or check_activation_stats:
                self._passes(batch, results, num_forward_passes, check_gradient_norm, check_activation_stats)
        finally:
            self.model.train(was_training)
        switched = []
        if drift_bound is not None:
            for r in results:
                if getattr(r, f"drift_{bound_on}") > drift_bound and self.blocks[r.name].policy != "store":
                    self.blocks[r.name].policy = "store"
                    switched.append(r.name)
        grads = [r.grad_norm for r in results if r.grad_norm is not None]
        return StabilityReport(results, max(grads) if grads else None,
                               {r.name: r.activation for r in results if r.activation},
                               max(r.drift_fp32 for r in results), max(r.drift_bf16 for r in results),
                               drift_bound, switched, num_forward_passes)

    def _drifts(self, batch) -> list[BlockStability]:
        """Capture each block's real inputs in one eval forward, then invert each block alone."""
        seen: dict[str, tuple] = {}

        def pre(name):
            def hook(module, args, kwargs):
                kw = {k: v for k, v in kwargs.items() if k != "_tape"}
                seen[name] = (args[0].detach().float(), args[1].detach().float(), kw)
            return hook

        self.model.eval()
        handles = [b.register_forward_pre_hook(pre(n), with_kwargs=True) for n, b in self.blocks.items()]
        try:
            with torch.no_grad():
                self.loss_fn(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in self.blocks if n not in seen]
        if missing:
            raise ValueError(f"blocks {missing} did not run on this batch")
        return [BlockStability(n, _drift(b, *seen[n], torch.float32), _drift(b, *seen[n], torch.bfloat16))
                for n, b in self.blocks.items()]

    def _passes(self, batch, results: list[BlockStability], passes: int, grads: bool, stats: bool) -> None:
        by_name = {r.name: r for r in results}

        def post(name):
            def hook(module, args, out):
                by_name[name].activation = _stats(*out)
            return hook

        self.model.train()
        handles = [b.register_forward_hook(post(n)) for n, b in self.blocks.items()] if stats else []
        try:
            for _ in range(passes):
                with torch.set_grad_enabled(grads):
                    loss = self.loss_fn(self.model, batch)
                if grads:
                    self._grad_norms(loss, by_name)
        finally:
            for h in handles:
                h.remove()

    def _grad_norms(self, loss: Tensor, by_name: dict[str, BlockStability]) -> None:
        params = {n: [p for p in b.parameters() if p.requires_grad] for n, b in self.blocks.items()}
        flat = [p for ps in params.values() for p in ps]
        gs = iter(torch.autograd.grad(loss, flat, allow_unused=True))
        for n, ps in params.items():
            sq = sum(float(g.double().pow(2).sum()) for g in (next(gs) for _ in ps) if g is not None)
            r = by_name[n]
            r.grad_norm = max(r.grad_norm or 0.0, sq ** 0.5)
