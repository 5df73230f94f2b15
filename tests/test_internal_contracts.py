"""The engine's internal contracts: who imports whom, and options that belong to a model or a call."""
import ast
import pathlib

import pytest
import torch

import revnet_zero
from revnet_zero import couplings, layers
from revnet_zero.layers import coupling_layers

ROOT = pathlib.Path(revnet_zero.__file__).parent


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from X import names`` in the file (relative dots kept)."""
    tree = ast.parse(path.read_text())
    return [("." * n.level + (n.module or ""), [a.name for a in n.names])
            for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]


def test_the_engine_imports_no_layer_model_or_conversion_module():
    """layers import the engine; the engine's own modules must not import layers back (no cycle)."""
    for name in ("engine.py", "couplings.py", "_autograd.py", "drift.py", "ops/kept_attention.py"):
        for module, _ in _imports(ROOT / name):
            assert not any(part in module for part in ("layers", "models", "conversion")), (name, module)


def test_no_private_engine_helper_is_imported_elsewhere():
    for path in ROOT.rglob("*.py"):
        for module, names in _imports(path):
            if module.endswith("engine") or module.endswith("_autograd"):
                private = [n for n in names if n.startswith("_")]
                assert not private, (str(path.relative_to(ROOT)), module, private)


def test_coupling_import_paths_are_the_same_objects():
    for name in ("AdditiveCoupling", "AffineCoupling", "BaseCoupling", "CouplingType", "StepCoupling",
                 "make_coupling", "seq_tiles"):
        assert getattr(coupling_layers, name) is getattr(couplings, name)
    assert layers.AdditiveCoupling is revnet_zero.AdditiveCoupling is couplings.AdditiveCoupling


def test_attention_backend_is_a_module_option():
    """The CUDA kernel of reversible attention is chosen per module (and per model config), not by a
    process-wide switch; bad names are refused where they are given."""
    from revnet_zero import TransformerConfig
    from revnet_zero.layers import ReversibleAttention, SelfAttention
    from revnet_zero.models.reversible_transformer import build_block
    from revnet_zero.ops import kept_attention
    assert SelfAttention(32, 4, sdpa_backend="flash").sdpa_backend == "flash"
    assert ReversibleAttention(32, 4, sdpa_backend="flash").attention.sdpa_backend == "flash"
    cfg = TransformerConfig.preset("tiny", attention_backend="flash")
    assert build_block(cfg).coupling.f.sdpa_backend == "flash"
    assert not hasattr(kept_attention, "CUDA_BACKEND")
    with pytest.raises(ValueError, match="sdpa_backend must be one of"):
        SelfAttention(32, 4, sdpa_backend="math")
    with pytest.raises(ValueError, match="attention_backend must be"):
        TransformerConfig.preset("tiny", attention_backend="math")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="cuda_backend must be one of"):
        kept_attention.attention(q, q, q, is_causal=True, cuda_backend="math")
