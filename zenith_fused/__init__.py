"""zenith-fused: ZENITH (momentum SGD scaled by its gradient-norm history) as a fused optimizer."""
from ._checkpoint import get_optimizer_state_dict, set_optimizer_state_dict
from .optimizer import ZenithFused
from .reference import ZenithHistory

__all__ = ["ZenithFused", "ZenithHistory", "get_optimizer_state_dict", "set_optimizer_state_dict"]
__version__ = "0.1.0"
