"""Tuple states: several tensors solved as one, flattened along their per-sample dimensions.

The parts are concatenated along one last dimension and split back by slicing (as torchdiffeq
does, so an output part's autograd history is a view of a slice of the solution). Leading
dimensions (output times, samples) pass through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

State = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class TupleLayout:
    shapes: tuple[torch.Size, ...] | None  # each part's shape without the batch dimension; None: a tensor state

    @staticmethod
    def of(y0: State, batched: bool) -> TupleLayout:
        """The layout of ``y0``: a tensor passes through; the parts of a tuple keep their shapes
        (after the batch dimension, when ``batched``)."""
        if isinstance(y0, Tensor):
            return TupleLayout(None)
        if not isinstance(y0, tuple) or not y0 or not all(isinstance(part, Tensor) for part in y0):
            raise TypeError(f"y0 must be a tensor or a tuple of tensors, got {type(y0).__name__}")
        if len({part.dtype for part in y0}) != 1 or len({part.device for part in y0}) != 1:
            raise ValueError("the tensors of a tuple y0 must share one dtype and device")
        if batched and (any(part.dim() < 1 for part in y0) or len({part.shape[0] for part in y0}) != 1):
            raise ValueError("the tensors of a tuple y0 must all have shape [B, ...] with the same B")
        return TupleLayout(tuple(part.shape[1:] if batched else part.shape for part in y0))

    def flatten(self, y: State, name: str = "y0") -> Tensor:
        if self.shapes is None:
            return cast(Tensor, y)  # no layout: a tensor state
        if not isinstance(y, (tuple, list)) or len(y) != len(self.shapes):
            raise ValueError(f"{name} must be a tuple of {len(self.shapes)} tensors, like y0")
        flat = []
        for i, (part, shape) in enumerate(zip(y, self.shapes)):
            lead = part.dim() - len(shape) if isinstance(part, Tensor) else -1
            if lead < 0 or part.shape[lead:] != shape:
                got = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                raise ValueError(f"{name}[{i}] must have shape {tuple(shape)} (after any batch dimension), got {got}")
            flat.append(part.reshape(*part.shape[:lead], -1))
        return torch.cat(flat, -1)

    def unflatten(self, y: Tensor) -> State:
        if self.shapes is None:
            return y
        parts, start = [], 0
        for shape in self.shapes:
            end = start + shape.numel()
            # view((...)), a tuple, so that a leading () and a part of shape () work too
            parts.append(y[..., start:end].view((*y.shape[:-1], *shape)))
            start = end
        return tuple(parts)
