"""Neural ODE models: ODE-Net for images (more in the models issue)."""

from .odenet import ConcatConv2d, ODEFunc

__all__ = ["ConcatConv2d", "ODEFunc"]
