"""``convert_to_reversible`` / ``convert_from_reversible`` for Hugging Face decoder models."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .bdia import BDIALayer
from .families import FAMILIES, check_family, family_of
from .bdia_reference import BDIAReferenceLayer
from .grid import GRID_STEPS, GridStep, gamma_bits
from .offload import HostQueue
from .rmsnorm import lean_rmsnorm, plain_rmsnorm
from .tiling import check_chunk, tile_mlp, untile_mlp
from .two_stream import TwoStreamLayer
from .wrapping import CheckpointedLayer, WrappedLayer, _Stack

COUPLINGS = ("bdia", "additive", "affine")
# Pre-norm residual decoder layers, by the sub-modules that identify them.
LAYOUTS = {"GPT-2": ("ln_1", "attn", "ln_2", "mlp"),
           "Llama": ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")}
SUPPORTED = ("GPT2Model, GPT2LMHeadModel, LlamaModel, LlamaForCausalLM and other Hugging Face models whose "
             "decoder layers sit in a ModuleList at .h or .layers (the tested families: conversion.families)")


@dataclass
class ConversionReport:
    """What ``convert_to_reversible`` did, and the measured output gap (eval, fp as the model)."""

    model: str                 # class name of the converted model
    coupling: str              # 'bdia', 'additive' or 'affine'
    setting: str               # gamma0 (bdia) or scale (two-stream)
    reversible: list[int]      # indices of the layers made reversible
    checkpointed: list[tuple[int, str, str]] = field(default_factory=list)  # (index, class, why)
    compared: str = ""         # which output the gap is measured on, and the probe's shape
    gap_max_abs: float = float("nan")  # max |converted - original|
    gap_rel: float = float("nan")      # ||converted - original|| / ||original||
    mlp_chunk: int | None = None       # positions per MLP tile in training (None: untiled)
    lean_norms: int = 0                # RMSNorm modules given the lean backward (rmsnorm.py)
    offload: bool = False              # bdia: grid tensors and kept bits in pinned host memory
    family: str | None = None          # config.model_type (a key of conversion.families.FAMILIES if tested)
    grid_step: str = "auto"            # bdia: how the update and grid step run (GridStep's mode)

    def __str__(self) -> str:
        tested = "" if self.family in FAMILIES else " (not a tested family)"
        lines = [f"convert_to_reversible: {self.model}, coupling={self.coupling!r} ({self.setting}), "
                 f"{len(self.reversible) + len(self.checkpointed)} layers{tested}",
                 f"  reversible layers: {_ranges(self.reversible) or 'none'}"]
        if self.checkpointed:
            lines.append("  activation checkpointing (could not be made reversible):")
            lines += [f"    layer {i} ({name}): {why}" for i, name, why in self.checkpointed]
        else:
            lines.append("  activation checkpointing: none")
        if self.lean_norms:
            lines.append(f"  {self.lean_norms} RMSNorm modules keep only their input and 1/rms in training "
                         "(same forward bits, analytic backward)")
        if self.mlp_chunk:
            lines.append(f"  MLPs of the reversible layers run in tiles of {self.mlp_chunk} positions in training")
        if self.offload:
            lines.append("  training keeps the fixed-point activations and the stored bits in pinned host memory")
        lines.append(f"  conversion gap on {self.compared}: max |diff| {self.gap_max_abs:.3g}, "
                     f"relative {self.gap_rel:.3g}")
        return "\n".join(lines)


def _ranges(ix: list[int]) -> str:
    out, start = [], None
    for j, i in enumerate(ix):
        if start is None:
            start = i
        if j + 1 == len(ix) or ix[j + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


def _layer_list(model: nn.Module) -> tuple[nn.Module, str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_to_reversible needs a torch.nn.Module, got {type(model).__name__}")
    base = getattr(model, "base_model", model)
    for name in ("h", "layers"):
        if isinstance(getattr(base, name, None), nn.ModuleList):
            return base, name
    raise TypeError(f"convert_to_reversible supports {SUPPORTED}; {type(model).__name__} has no such layer list")


def _why_not_reversible(layer: nn.Module) -> str | None:
    if any(all(hasattr(layer, n) for n in names) for names in LAYOUTS.values()):
        return None
    layouts = "; ".join(f"{k}: {', '.join(v)}" for k, v in LAYOUTS.items())
    return f"not a recognised pre-norm residual layer (expected sub-modules {layouts})"


def _refuse_stateful(layers: nn.ModuleList) -> None:
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                raise ValueError(f"layer {i} has {type(m).__name__} {name!r} with running statistics, which "
                                 "recomputing the layer would update twice; neither a reversible layer nor "
                                 "checkpointing can run it")


def _wrap(model: nn.Module, make, checkpoint_segments: int | None) -> tuple[list[int], list]:
    """Replace every decoder layer by ``make(layer, index, stack, starts, ends, pos_in_run)`` or, when it
    cannot be made reversible, by a ``CheckpointedLayer``."""
    base, name = _layer_list(model)
    layers = getattr(base, name)
    if any(isinstance(m, WrappedLayer) for m in layers):
        raise ValueError(f"{type(model).__name__} is already converted; convert_from_reversible undoes it")
    if any(getattr(m, "gradient_checkpointing", False) for m in (base, *layers)):
        raise ValueError("the model has Hugging Face gradient checkpointing enabled; call "
                         "model.gradient_checkpointing_disable() first (converted layers that cannot be made "
                         "reversible are checkpointed by the converter)")
    _refuse_stateful(layers)
    why = [_why_not_reversible(layer) for layer in layers]
    fallback = [(i, type(layers[i]).__name__, w) for i, w in enumerate(why) if w is not None]
    if checkpoint_segments is not None and len(fallback) > checkpoint_segments:
        names = ", ".join(f"{i} ({c})" for i, c, _ in fallback)
        raise ValueError(f"{len(fallback)} layers cannot be made reversible ({names}) but checkpoint_segments="
                         f"{checkpoint_segments} allows at most {checkpoint_segments} checkpointed layers")
    stack, n, pos = _Stack(), len(layers), 0
    for i in range(n):
        if why[i] is not None:
            layers[i], pos = CheckpointedLayer(layers[i], i, stack), 0
            continue
        starts, ends = i == 0 or why[i - 1] is not None, i == n - 1 or why[i + 1] is not None
        layers[i] = make(layers[i], i, stack, starts, ends, pos)
        pos += 1
    return [i for i in range(n) if why[i] is None], fallback


def _probe_output(model: nn.Module, ids: Tensor) -> tuple[Tensor, str]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=ids)
    finally:
        model.train(was_training)
    logits = getattr(out, "logits", None)
    return (logits, "logits") if logits is not None else (out.last_hidden_state, "last_hidden_state")


def _default_probe(model: nn.Module) -> Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ValueError(f"cannot build a probe for {type(model).__name__} (no config.vocab_size); pass probe=")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)  # a local generator: the global RNG is left alone
    return torch.randint(0, vocab, (1, 32), generator=gen).to(device)


def convert_to_reversible(model: nn.Module, coupling: str = "bdia", checkpoint_segments: int | None = None, *,
                          gamma0: float = 0.5, scale: float = 0.5, probe: Tensor | None = None,
                          inplace: bool = False, verbose: bool = True,
                          mlp_chunk_size: int | None = None, offload: bool = False,
                          untested: bool = False, grid_step: str = "auto") -> nn.Module:
    """A Hugging Face decoder model whose training keeps no per-layer activations.

    Supported: the families of ``revnet_zero.conversion.families.FAMILIES`` (GPT-2, Llama, Mistral,
    Qwen2/2.5, Qwen3, Qwen3-MoE, Mixtral, Gemma 2, Gemma 3, Phi-3), each tested on its own config
    class; another model is refused with that list unless ``untested=True``. The result is the same
    model class with the same weights and output types (``.last_hidden_state``, ``.logits``, ``.loss``,
    ``.aux_loss``).

    ``coupling``:
      * ``'bdia'`` (default): exact. Eval / ``torch.no_grad()`` run the original layers, so outputs
        equal the original model's; training runs BDIA (``gamma0`` ∈ {1/2, 1/4, 1/8}: the size of
        the random ±γ per sample and layer), rebuilding every activation bit for bit in backward
        and storing ``log2(1/gamma0)`` bits per activation element per layer.
      * ``'additive'`` / ``'affine'``: two-stream couplings (``affine``: constant scale ``scale``,
        MEFT-style); they change the function: the gap is measured and reported, not hidden.

    ``checkpoint_segments``: layers that cannot be made reversible (not a recognised pre-norm
    residual layer) run under activation checkpointing, one segment each (it keeps the layer's
    input); this is the most such layers allowed (``None``: no limit; ``0``: all must be reversible).

    In the reversible layers, the RMSNorms of every tested family keep only their input and ``1/rms``
    in training, with the same forward bits (``revnet_zero.conversion.rmsnorm``).

    ``mlp_chunk_size``: positions per MLP tile in training (``None``: untiled). At long context the
    MLP's intermediates are the layer's largest tensors (Llama-3-8B: three ``[S, 14336]``); tiled,
    only one tile of them exists at a time, for one more MLP forward per layer in backward
    (``revnet_zero.conversion.tiling``). Eval and ``torch.no_grad()`` are unaffected.

    ``offload`` ('bdia' only): in training, the two fixed-point activation tensors that BDIA carries
    from layer to layer (int64, 16 bytes per element) and every layer's stored bits wait in pinned host
    memory while the layers run; copies to the host overlap the layers' kernels on a side stream, the
    copies back (after each layer's backward) do not. GPU memory is then the weights plus one layer's
    working set, whatever the depth; host memory holds ``16 + L·m/8`` bytes per element. For the
    longest contexts; at short ones the copies cost more than they save.

    ``untested``: convert a model of no tested family anyway (its layers must still have the pre-norm
    residual form; the report says it is untested).

    ``grid_step`` ('bdia' only): how the update and fixed-point step between layers run, all with the
    same bits: ``'eager'`` (PyTorch ops), ``'compiled'`` (torch.compile, on CUDA), ``'triton'`` (the
    one-pass kernels of ``revnet_zero.kernels``, on CUDA; needs ``pip install revnet-zero[triton]``) or
    ``'auto'`` (compiled on CUDA, else eager). Offload runs the eager step (in place). A step that fails
    to compile or launch warns once and this model runs it eagerly from then on
    (``revnet_zero.conversion.grid.GridStep``).

    The gap is measured in eval on ``probe`` (default: 32 random tokens) against the unconverted
    model; the report is printed (``verbose``) and kept as ``model.reversible_report``.
    The model is copied unless ``inplace=True``.

    Example::

        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=64, n_head=4))
        rev = convert_to_reversible(model)          # prints which layers became reversible, and the gap
        rev.train()
        rev(input_ids=ids, labels=ids).loss.backward()
    """
    coupling = getattr(coupling, "value", coupling)  # CouplingType.ADDITIVE -> 'additive'
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    if checkpoint_segments is not None and (isinstance(checkpoint_segments, bool)
                                            or not isinstance(checkpoint_segments, int) or checkpoint_segments < 0):
        raise ValueError(f"checkpoint_segments must be None or an int >= 0, got {checkpoint_segments!r}")
    m = gamma_bits(gamma0)
    if not isinstance(offload, bool):
        raise TypeError(f"offload must be a bool, got {type(offload).__name__}")
    if offload and coupling != "bdia":
        raise ValueError(f"offload=True keeps BDIA's grid tensors in host memory; coupling={coupling!r} has none "
                         "(use coupling='bdia')")
    if grid_step not in GRID_STEPS:
        raise ValueError(f"grid_step must be one of {GRID_STEPS}, got {grid_step!r}")
    if grid_step != "auto" and coupling != "bdia":
        raise ValueError(f"grid_step={grid_step!r} chooses how BDIA's grid step runs; coupling={coupling!r} has none")
    if mlp_chunk_size is not None:
        check_chunk(mlp_chunk_size)
    if coupling == "affine" and not 0 < scale < 1:
        raise ValueError(f"scale (the affine coupling's constant λ) must be in (0, 1), got {scale!r}")
    lam = 1.0 if coupling == "additive" else scale
    if not isinstance(untested, bool):
        raise TypeError(f"untested must be a bool, got {type(untested).__name__}")
    if family_of(model) is None:
        _layer_list(model)   # not a Hugging Face model: say what it lacks first
    family = check_family(model, untested)
    _layer_list(model)
    if probe is None:
        probe = _default_probe(model)
    reference, compared = _probe_output(model, probe)
    if not inplace:
        model = copy.deepcopy(model)
    if coupling == "bdia":
        queue, step = (HostQueue() if offload else None), GridStep(grid_step)   # one each per model

        def make(layer, i, stack, starts, ends, pos):
            return BDIALayer(layer, i, stack, starts, ends, m, queue, step)
        setting = f"gamma0=1/{2 ** m}"
    else:
        def make(layer, i, stack, starts, ends, pos):
            return TwoStreamLayer(layer, i, stack, starts, ends, dst=pos % 2, scale=lam)
        setting = f"scale={lam:g}"
    reversible, fallback = _wrap(model, make, checkpoint_segments)
    lean = _lean_layers(model, reversible, mlp_chunk_size)
    out, _ = _probe_output(model, probe)
    diff = (out.double() - reference.double())
    report = ConversionReport(type(model).__name__, coupling, setting, reversible, fallback,
                              compared=f"{compared}, probe {tuple(probe.shape)}",
                              gap_max_abs=diff.abs().max().item(),
                              gap_rel=(diff.norm() / reference.double().norm().clamp_min(1e-300)).item(),
                              mlp_chunk=mlp_chunk_size, lean_norms=lean, offload=offload, family=family,
                              grid_step=grid_step)
    model.reversible_report = report
    # a plain function, not a method bound to the model: pickle finds it by name (a bound method failed)
    model.gradient_checkpointing_enable = _checkpointing_not_needed
    if verbose:
        print(report)
    return model


def _checkpointing_not_needed(*args, **kwargs) -> None:
    """``gradient_checkpointing_enable`` of a converted model: a no-op with a notice. Trainers turn
    checkpointing on by default (TRL's ``SFTConfig``); the reversible layers keep no activations, so
    checkpointing would only run every layer once more. Layers that could not be made reversible are
    checkpointed by the converter already."""
    warnings.warn("revnet_zero: gradient_checkpointing_enable() ignored: the converted model's reversible layers "
                  "keep no activations, so checkpointing would only recompute them again", UserWarning, stacklevel=2)


def bdia_reference(model: nn.Module, gamma0: float = 0.5, mlp_chunk_size: int | None = None) -> nn.Module:
    """A copy of an unconverted model whose training forward is BDIA under plain autograd (every
    activation kept): the reference that ``convert_to_reversible(coupling='bdia')`` is tested against
    (with the same ``mlp_chunk_size``, its MLPs run in the same tiles; its RMSNorms use the same lean
    Function, which tests/test_conversion.py pins to Hugging Face's own)."""
    m = gamma_bits(gamma0)
    model = copy.deepcopy(model)
    reversible, _ = _wrap(model, lambda layer, i, stack, starts, ends, pos:
                          BDIAReferenceLayer(layer, i, stack, starts, ends, m), None)
    _lean_layers(model, reversible, mlp_chunk_size)
    return model


def _lean_layers(model: nn.Module, indices: list[int], mlp_chunk: int | None) -> int:
    """Tile the MLPs of the layers ``indices`` (``mlp_chunk`` positions, or none) and give their
    RMSNorms the lean backward; returns how many norms got it."""
    base, name = _layer_list(model)
    lean = 0
    for i in indices:
        layer = getattr(base, name)[i].layer
        if mlp_chunk is not None and isinstance(getattr(layer, "mlp", None), nn.Module):
            tile_mlp(layer.mlp, mlp_chunk)
        lean += sum(lean_rmsnorm(mod) for mod in layer.modules())
    return lean


def convert_from_reversible(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The plain Hugging Face model again: every converted layer replaced by the layer it wraps (same
    weights, fine-tuned ones included), so ``save_pretrained`` writes the original format and the
    result loads in plain ``transformers``. For 'bdia' this is the converted model's eval function
    exactly; for 'additive'/'affine' it differs from the converted model by the conversion gap.
    The model is copied unless ``inplace=True``.
    """
    base, name = _layer_list(model)
    if not any(isinstance(m, WrappedLayer) for m in getattr(base, name)):
        raise ValueError(f"{type(model).__name__} has no converted layers; nothing to undo")
    if not inplace:
        model = copy.deepcopy(model)
        base, name = _layer_list(model)
    layers = getattr(base, name)
    for i, m in enumerate(layers):
        if isinstance(m, WrappedLayer):
            layers[i] = m.layer
            if isinstance(getattr(m.layer, "mlp", None), nn.Module):
                untile_mlp(m.layer.mlp)
            for mod in m.layer.modules():
                plain_rmsnorm(mod)
    for name in ("reversible_report", "gradient_checkpointing_enable"):
        model.__dict__.pop(name, None)
    return model
