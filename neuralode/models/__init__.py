"""Neural ODE models: ODE-Net and the paper's baselines for MNIST; CNFs for densities."""

from .odenet import MLP, ConcatConv2d, ODEBlock, ODEFunc, ODENet, ResNet, count_parameters

__all__ = ["MLP", "ConcatConv2d", "ODEBlock", "ODEFunc", "ODENet", "ResNet", "count_parameters"]
