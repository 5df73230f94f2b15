"""Research features whose math may still change between releases: continuous-depth reversible
networks (exact reversible ODE integrators) and hierarchical attention."""
from .continuous_depth import (
    ContinuousDepthConfig,
    ContinuousDepthOutput,
    ContinuousDepthRevNet,
    TransformerVectorField,
)
from .hierarchical import HierarchicalReversibleAttention
from .ode_solvers import AsyncLeapfrog, MomentumResidual, ReversibleHeun, ReversibleSolver

__all__ = ["AsyncLeapfrog", "ContinuousDepthConfig", "ContinuousDepthOutput", "ContinuousDepthRevNet",
           "HierarchicalReversibleAttention", "MomentumResidual", "ReversibleHeun", "ReversibleSolver",
           "TransformerVectorField"]
