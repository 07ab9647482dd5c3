"""Implicit Runge–Kutta methods (fixed step), solved per sample by Broyden's method.

Each step solves the stage equations ``k_i = f(t + c_i h, y + h Σ_j a_ij k_j)`` for the
implicit stages of every row, starting from ``k_i = f(t, y)`` and the identity as the
Jacobian estimate (as torchdiffeq does), until the residual's 2-norm is below 1e-8 (1e-6 in
float32) or ``max_iters`` iterations. Every row iterates on its own and stops when it has
converged: a batch costs each sample what it would alone. The Jacobian estimate is dense,
``(stages × state size)²`` per sample, so these methods suit small systems.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .solver import Attempt, Perturbation, Solver, evaluate, nudged, per_row, rows_of
from .tableau import ImplicitTableau


def _residual_tolerance(dtype: torch.dtype) -> float:
    return 1e-6 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8


class ImplicitRK(Solver):
    fsal = False

    def __init__(self, name: str, tableau: ImplicitTableau, order: int, max_iters: int = 100) -> None:
        self.name, self.tableau, self.order, self.max_iters = name, tableau, order, max_iters
        self.quadrature = tableau.b
        self._unknown = tableau.implicit_stages
        self._given = tuple(i for i in range(tableau.stages) if i not in self._unknown)

    def __repr__(self) -> str:
        return f"ImplicitRK({self.name!r})"

    def with_options(self, *, max_iters: int | None = None) -> ImplicitRK:
        return ImplicitRK(self.name, self.tableau, self.order, max_iters or self.max_iters)

    def step_cost(self, rows: dict[str, Tensor] | None) -> int:
        explicit = sum(1 for i in self._given if self.tableau.c[i] != 0.0)
        return 1 + explicit + len(self._unknown) * (self.max_iters + 1)

    def step(self, func, t, y, dt, t1, rows, perturbation: Perturbation | None, rtol, atol) -> Attempt:
        tableau = self.tableau
        after = None if perturbation is None else perturbation.after_start
        before = None if perturbation is None else perturbation.before_end
        t_start = nudged(t, t1, after)
        f0 = evaluate(func, t_start, y)
        nfe = torch.ones(y.shape[0], dtype=torch.int64, device=y.device)
        stage_t = [
            t + c * dt if c not in (0.0, 1.0) else (t_start if c == 0.0 else nudged(t1, t, before)) for c in tableau.c
        ]
        ks = [f0] * tableau.stages
        for i in self._given:  # explicit stages depend on y alone
            if tableau.c[i] != 0.0:
                ks[i] = evaluate(func, stage_t[i], y)
                nfe = nfe + 1
        unknown = torch.stack([ks[i] for i in self._unknown], 1)  # [B, m, *S]
        solved, evaluations = self._broyden(func, t, y, dt, stage_t, ks, unknown)
        nfe = nfe + evaluations * len(self._unknown)
        for position, i in enumerate(self._unknown):
            ks[i] = solved[:, position]
        h = rows_of(dt, y)
        stage_y = [y + h * sum(a * k for a, k in zip(row, ks) if a != 0.0) if any(row) else y for row in tableau.a]
        y1 = y + h * sum(b * k for b, k in zip(tableau.b, ks) if b != 0.0)
        return Attempt(y1=y1, error=None, nfe=nfe, stage_t=stage_t, stage_y=stage_y, ks=ks, f0=f0, rows={})

    def _stage_residual(self, func, y, h, stage_t, ks, unknown, index) -> Tensor:
        """``k_i - f(t_i, y + h Σ_j a_ij k_j)`` for the unknown stages of rows ``index``, flat."""
        full = [k.index_select(0, index) for k in ks]
        for position, i in enumerate(self._unknown):
            full[i] = unknown[:, position]
        y_rows, h_rows = y.index_select(0, index), h.index_select(0, index)
        residuals = []
        for i in self._unknown:
            row = self.tableau.a[i]
            y_i = y_rows + h_rows * sum(a * k for a, k in zip(row, full) if a != 0.0)
            residuals.append(full[i] - evaluate(func, stage_t[i].index_select(0, index), y_i))
        return per_row(torch.stack(residuals, 1))

    def _broyden(self, func, t, y, dt, stage_t, ks, unknown) -> tuple[Tensor, Tensor]:
        """Per-row Broyden iterations; returns the stages and each row's residual evaluations."""
        batch = y.shape[0]
        h = rows_of(dt, y)
        everyone = torch.arange(batch, device=y.device)
        x = per_row(unknown)
        shape = unknown.shape[1:]
        residual = self._stage_residual(func, y, h, stage_t, ks, unknown, everyone)
        evaluations = torch.ones(batch, dtype=torch.int64, device=y.device)
        jacobian = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(batch, -1, -1)
        tolerance = _residual_tolerance(y.dtype)
        active = torch.linalg.vector_norm(residual, dim=1) >= tolerance
        for _ in range(self.max_iters):
            index = active.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            step, info = torch.linalg.solve_ex(jacobian[index], -residual[index])
            healthy = info == 0  # a singular estimate stops the row where it is, as in torchdiffeq
            step = torch.where(healthy[:, None], step, torch.zeros_like(step))
            x_new = x[index] + step
            new_residual = self._stage_residual(func, y, h, stage_t, ks, x_new.view(-1, *shape), index)
            change = new_residual - residual[index]
            denominator = (step * step).sum(1).clamp_min(torch.finfo(x.dtype).tiny)
            correction = (change - (jacobian[index] @ step[:, :, None])[:, :, 0])[:, :, None] * step[:, None, :]
            jacobian = jacobian.index_put((index,), jacobian[index] + correction / denominator[:, None, None])
            x = x.index_put((index,), x_new)
            residual = residual.index_put((index,), new_residual)
            evaluations = evaluations.index_put((index,), evaluations[index] + 1)
            still = (torch.linalg.vector_norm(new_residual, dim=1) >= tolerance) & healthy
            active = active.index_put((index,), still)
        if bool((torch.linalg.vector_norm(residual, dim=1) >= tolerance).any()):
            warnings.warn(
                f"{self.name}: the stage equations did not converge; the solution may be inaccurate", stacklevel=4
            )
        return x.view(-1, *shape), evaluations
