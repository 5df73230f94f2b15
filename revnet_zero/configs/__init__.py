"""Presets read off committed benchmark tables: ``OptimalConfigs.get_config(...)``."""
from .optimal import OptimalConfig, OptimalConfigs

__all__ = ["OptimalConfig", "OptimalConfigs"]
