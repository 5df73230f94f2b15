"""Research features: continuous-depth reversible networks (exact reversible ODE integrators)."""
from .continuous_depth import (
                               ContinuousDepthConfig,
                               ContinuousDepthOutput,
                               ContinuousDepthRevNet,
                               TransformerVectorField,
)
from .ode_solvers import (
                               AsyncLeapfrog,
                               MomentumResidual,
                               ReversibleHeun,
                               ReversibleSolver,
)

__all__ = ["AsyncLeapfrog", "ContinuousDepthConfig", "ContinuousDepthOutput", "ContinuousDepthRevNet",
           "MomentumResidual", "ReversibleHeun", "ReversibleSolver", "TransformerVectorField"]
