"""ODE-Net for MNIST (Chen et al. 2018) and the baselines of the paper's Table 1."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Unpack, cast

import torch
from torch import Tensor, nn

from ..precision import in_precision, precision_dtype
from ..solvers import Solution, rms_norm, solve_ivp
from ..solvers.accuracy import Accuracy, solve_settings
from .regularisation import (
    INTEGRALS,
    Regularisation,
    draw_noise,
    hutchinson_jacobian,
    integrals_of,
    mean_square,
    rate_columns,
)
from .servable import Signature, Start, TensorSpec

IMAGE_SIDE = 28


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class ConcatConv2d(nn.Module):
    """A convolution that sees time as one more input channel, so f can depend on t.

    ``t`` is a scalar or one time per sample (``[B]``): under per-sample solving every image
    is at its own time.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in + 1, dim_out, kernel_size, stride, padding)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        time = t.to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return self.conv(torch.cat([time, x], 1))


class ODEFunc(nn.Module):
    """f(t, z) = GN(ConcatConv(ReLU(GN(ConcatConv(ReLU(GN(z))))))).

    GroupNorm normalises within each sample, so f treats samples independently, which
    per-sample solving requires (BatchNorm would not).
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = group_norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = group_norm(channels)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        out = self.conv1(t, torch.relu(self.norm1(z)))
        out = self.conv2(t, torch.relu(self.norm2(out)))
        return self.norm3(out)


class ODEBlock(nn.Module):
    """z(1) from z(0) = input, solved per sample at the tolerance each call asks for.

    ``adjoint=True`` trains with the adjoint method (O(1) memory in the number of steps);
    ``False`` backpropagates through the solver (RK-Net). The adjoint is only set up when
    gradients are being recorded. ``first_step`` is the step each solve tries first; None
    picks it by Hairer's rule, which costs one evaluation and is short by design. A
    regularised model whose trajectories are nearly straight is cheaper tried over the whole
    span (``first_step=t1``): most of its solves then end in one step.
    """

    def __init__(
        self,
        func: nn.Module,
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        adjoint: bool = True,
        t1: float = 1.0,
        first_step: float | None = None,
    ) -> None:
        super().__init__()
        self.func = func
        self.method, self.rtol, self.atol, self.adjoint, self.t1 = method, rtol, atol, adjoint, t1
        self.first_step = first_step

    def forward(self, z: Tensor, **accuracy: Unpack[Accuracy]) -> tuple[Tensor, Solution]:
        solution = self._solve(self.func, z, accuracy)
        return cast(Tensor, solution.y1), solution  # the state is a tensor

    def forward_regularised(
        self,
        z: Tensor,
        regularisation: Regularisation,
        *,
        generator: torch.Generator | None = None,
        precision: str | None = None,
    ) -> tuple[Tensor, Solution, Tensor]:
        """z(1), the solution and the integrals ``[B, 2]`` (∫‖f‖² dt/D, ∫‖εᵀ ∂f/∂z‖² dt/D) at the
        block's own tolerance, all from one solve of the flat per-sample state ``[z, ε, K, J]``
        (``solution.y1`` is that state; ε only with the Jacobian term, zeros when it is off).
        The Rademacher noise ε is drawn here, once per sample, from ``generator``. ``precision``
        is what f (with the regularisers' rates) is evaluated in; the state stays float32."""
        if regularisation.density_curvature > 0:
            raise ValueError("the density curvature is a CNF's regulariser: ODE-Net has no log-density")
        if regularisation.local_error > 0:
            raise ValueError("the local error term is trained for CNFs only (CNF.span_error)")
        accuracy: Accuracy = {} if precision is None else {"precision": precision}
        if not regularisation.active:
            y1, solution = self(z, **accuracy)
            return y1, solution, z.new_zeros(z.shape[0], INTEGRALS)
        shape, size = z.shape[1:], z[0].numel()
        flat = z.flatten(1)
        with_jacobian = regularisation.jacobian > 0
        noise = draw_noise(flat, "rademacher", generator) if with_jacobian else flat[:, :0]
        noise_size = noise.shape[1]

        def dynamics(t: Tensor, state: Tensor) -> Tensor:
            differentiable = torch.is_grad_enabled()  # off in the adjoint's forward solve
            z = state[:, :size].view(-1, *shape)
            with torch.set_grad_enabled(differentiable or with_jacobian):
                if with_jacobian and not (differentiable and z.requires_grad):
                    z = z.detach().requires_grad_(True)  # a leaf to differentiate f by
                f = self.func(t, z)
                jacobian = None
                if with_jacobian:
                    probe = state[:, size : size + noise_size].view_as(z)
                    jacobian = hutchinson_jacobian(f, z, probe, create_graph=differentiable)
            rates = torch.cat(
                [f.flatten(1), f.new_zeros(f.shape[0], noise_size), rate_columns(mean_square(f), jacobian, f)], 1
            )
            return rates if differentiable else rates.detach()

        state = torch.cat([flat, noise, flat.new_zeros(flat.shape[0], INTEGRALS)], 1)
        solution = self._solve(dynamics, state, accuracy, norm=lambda scaled: rms_norm(scaled[:, :size]))
        y1 = cast(Tensor, solution.y1)  # the state is a tensor
        return y1[:, :size].view(-1, *shape), solution, integrals_of(y1, forward=True)

    def _solve(
        self,
        func: Callable[[Tensor, Tensor], Tensor],
        y0: Tensor,
        accuracy: Accuracy,
        *,
        norm: Callable[[Tensor], Tensor] | None = None,
    ) -> Solution:
        adjoint = self.adjoint and torch.is_grad_enabled()
        return solve_ivp(
            func,
            y0,
            (0.0, self.t1),
            **solve_settings(accuracy, rtol=self.rtol, atol=self.atol, method=self.method, first_step=self.first_step),
            norm=norm,
            adjoint=adjoint,
            adjoint_params=tuple(self.func.parameters()) if adjoint else None,
        )


def _in_precision(module: nn.Module, x: Tensor, precision: str | None) -> Tensor:
    """``module(x)`` evaluated in ``precision``, answering in ``x``'s dtype."""
    return in_precision(lambda _, x: module(x), precision_dtype(precision))(cast(Tensor, None), x)


def downsampling(channels: int = 64) -> nn.Sequential:
    """1×28×28 → channels×6×6, as in the paper's MNIST experiments."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, 1),
        group_norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 4, 2, 1),
        group_norm(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 4, 2, 1),
    )


def classifier_head(channels: int = 64, classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        group_norm(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)
    )


class ODENet(nn.Module):
    """Downsampling, one ODE block on 64×6×6, then the classifier head (≈0.21M parameters).

    ``forward`` returns the logits and the ODE block's per-sample :class:`Solution` (NFE,
    steps, status), so callers see what each prediction cost. The three stages are exposed
    separately for the server, which runs the ODE block through its own step scheduler.
    """

    def __init__(
        self,
        channels: int = 64,
        *,
        method: str = "dopri5",
        tol: float = 1e-3,
        adjoint: bool = True,
        first_step: float | None = None,
    ) -> None:
        super().__init__()
        self.downsample = downsampling(channels)
        self.block = ODEBlock(
            ODEFunc(channels), method=method, rtol=tol, atol=tol, adjoint=adjoint, first_step=first_step
        )
        self.head = classifier_head(channels)

    def forward(self, images: Tensor, **accuracy: Unpack[Accuracy]) -> tuple[Tensor, Solution]:
        """Logits and the block's solution. ``precision="bfloat16"`` evaluates the downsampling,
        f and the head in bfloat16; the ODE's state and step control stay float32."""
        precision = accuracy.get("precision")
        features, solution = self.block(_in_precision(self.downsample, images, precision), **accuracy)
        return _in_precision(self.head, features, precision), solution

    def forward_regularised(
        self,
        images: Tensor,
        regularisation: Regularisation,
        *,
        generator: torch.Generator | None = None,
        precision: str | None = None,
    ) -> tuple[Tensor, Solution, Tensor]:
        """Training's forward: logits, the solution and the regularisers' integrals ``[B, 2]``
        (see :meth:`ODEBlock.forward_regularised`), with the downsampling, f and the head in
        ``precision`` as :meth:`forward` evaluates them."""
        features, solution, integrals = self.block.forward_regularised(
            _in_precision(self.downsample, images, precision), regularisation, generator=generator, precision=precision
        )
        return _in_precision(self.head, features, precision), solution, integrals

    # ---- the servable-model protocol (neuralode.models.servable) ------------------------
    # One operation, "classify": images → downsampling (encode) → the ODE block per sample →
    # class probabilities from the head (decode).
    @property
    def first_step(self) -> float | None:
        return self.block.first_step

    def signatures(self) -> tuple[Signature, ...]:
        classes = cast(int, self.head[-1].out_features)  # the head ends in a Linear
        images = TensorSpec(
            "images",
            ("uint8", "float32"),
            (-1, IMAGE_SIDE, IMAGE_SIDE),
            "MNIST-shaped images: uint8 0..255, or float32 in [0, 1]; [N, 1, 28, 28] is accepted too",
        )
        return (
            Signature(
                "classify",
                (images,),
                (
                    TensorSpec(
                        "probabilities",
                        ("float32",),
                        (-1, classes),
                        "class probabilities; NaN where the item's solve failed",
                    ),
                    TensorSpec(
                        "labels", ("int32",), (-1,), "the most probable class; -1 where the item's solve failed"
                    ),
                ),
            ),
        )

    def initial_rows(self, operation: str, inputs: Mapping[str, Any], generator: torch.Generator) -> Tensor:
        """Images ``[N, 28, 28]`` with pixels in [0, 1] as rows ``[N, 1, 28, 28]``."""
        return inputs["images"][:, None]

    def encode(self, operation: str, rows: Tensor) -> Start:
        z0 = self.downsample(rows)
        t0 = torch.zeros(len(rows), dtype=z0.dtype, device=z0.device)
        return Start(z0, t0, torch.full_like(t0, self.block.t1))

    def ode_dynamics(self, t: Tensor, y: Tensor) -> Tensor:
        return self.block.func(t, y)

    def decode(self, operation: str, y1: Tensor) -> dict[str, Tensor]:
        return {"probabilities": torch.softmax(self.head(y1), dim=1)}

    error_norm = staticmethod(rms_norm)  # over the whole state

    def state_size(self, operation: str) -> int:
        return self._feature_shape()[1]

    def encode_bytes(self, operation: str) -> int:
        return self._feature_shape()[0]

    def _feature_shape(self) -> tuple[int, int]:
        """(bytes of the downsampling's widest activation, elements of its output) for one
        image, from a probe through its layers."""
        parameter = next(self.parameters())
        probe = torch.zeros(1, 1, IMAGE_SIDE, IMAGE_SIDE, dtype=parameter.dtype, device=parameter.device)
        widest = 0
        with torch.no_grad():
            for layer in self.downsample:
                probe = layer(probe)
                widest = max(widest, probe.numel() * probe.element_size())
        return widest, probe.numel()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 1, 1),
            group_norm(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 1, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResNet(nn.Module):
    """The paper's ResNet baseline: the same downsampling, six residual blocks (≈0.58M)."""

    def __init__(self, channels: int = 64, blocks: int = 6) -> None:
        super().__init__()
        self.downsample = downsampling(channels)
        self.blocks = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.head = classifier_head(channels)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.blocks(self.downsample(images)))


class MLP(nn.Module):
    """The paper's 1-layer MLP baseline: 784 → 300 → 10 (≈0.24M)."""

    def __init__(self, hidden: int = 300) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
