"""Neural ODE models: ODE-Net and the paper's baselines for MNIST; CNFs for densities."""

from .cnf import CNF, ConcatSquashMLP, PlanarDynamics, PlanarFlow, standard_normal_log_prob
from .odenet import MLP, ConcatConv2d, ODEBlock, ODEFunc, ODENet, ResNet, count_parameters
from .registry import build_model
from .regularisation import Regularisation

__all__ = [
    "CNF",
    "MLP",
    "ConcatConv2d",
    "ConcatSquashMLP",
    "ODEBlock",
    "ODEFunc",
    "ODENet",
    "PlanarDynamics",
    "PlanarFlow",
    "Regularisation",
    "ResNet",
    "build_model",
    "count_parameters",
    "standard_normal_log_prob",
]
