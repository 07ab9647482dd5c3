"""Neural ODE models: ODE-Net and the paper's baselines for MNIST; CNFs for densities."""

from .cnf import CNF, ConcatSquashMLP, PlanarDynamics, PlanarFlow, standard_normal_log_prob
from .odenet import MLP, ConcatConv2d, ODEBlock, ODEFunc, ODENet, ResNet, count_parameters
from .registry import ModelSpec, build_model, kinds, model_spec, register, specs, unregister
from .regularisation import Regularisation
from .servable import CLASSIFY, DENSITY, ServableModel, Signature, Start, TensorSpec

__all__ = [
    "CLASSIFY",
    "CNF",
    "DENSITY",
    "MLP",
    "ConcatConv2d",
    "ConcatSquashMLP",
    "ModelSpec",
    "ODEBlock",
    "ODEFunc",
    "ODENet",
    "PlanarDynamics",
    "PlanarFlow",
    "Regularisation",
    "ResNet",
    "ServableModel",
    "Signature",
    "Start",
    "TensorSpec",
    "build_model",
    "count_parameters",
    "kinds",
    "model_spec",
    "register",
    "specs",
    "standard_normal_log_prob",
    "unregister",
]
