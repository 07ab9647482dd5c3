"""The step-time model: seconds per solver step as a function of batch size, learned online."""

from __future__ import annotations


class StepTimer:
    """Seconds per solver step as a function of batch size, fitted online.

    A step costs a fixed overhead plus a share per row; both are estimated by least squares
    with exponential forgetting, so the estimate follows the machine's load. Once a few steps
    were seen, an observation counts as at most ``OUTLIER`` times the prediction: one step
    stalled by the machine must not make every deadline look hopeless."""

    OUTLIER = 3.0

    def __init__(self, memory: float = 0.95) -> None:
        self.memory = memory
        self._sums = [0.0] * 5  # weight, Σb, Σt, Σb², Σbt

    @property
    def observed(self) -> bool:
        return self._sums[0] > 0

    def observe(self, batch: int, seconds: float) -> None:
        if self._sums[0] >= 5:
            seconds = min(seconds, self.OUTLIER * self.predict(batch))
        w, sb, st, sbb, sbt = (self.memory * s for s in self._sums)
        self._sums = [w + 1, sb + batch, st + seconds, sbb + batch * batch, sbt + batch * seconds]

    def predict(self, batch: int) -> float:
        w, sb, st, sbb, sbt = self._sums
        if w == 0:
            return 0.0
        mean_b, mean_t = sb / w, st / w
        variance = sbb / w - mean_b * mean_b
        if variance < 1.0:  # one batch size seen: assume time proportional to rows
            return mean_t * max(batch, 1) / max(mean_b, 1.0)
        slope = max(0.0, (sbt / w - mean_b * mean_t) / variance)
        intercept = max(0.0, mean_t - slope * mean_b)
        return intercept + slope * max(batch, 1)
