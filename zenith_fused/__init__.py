"""zenith-fused: ZENITH (momentum SGD scaled by its gradient-norm history) as a fused optimizer."""
from .optimizer import ZenithFused
from .reference import ZenithHistory

__all__ = ["ZenithFused", "ZenithHistory"]
__version__ = "0.1.0"
