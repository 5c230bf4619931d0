"""The r_max / d_max warm-up of the Batch Renorm paper (Ioffe, 2017, section 4).

A schedule is a function of the step count (a layer's ``num_batches_tracked``
before the step). Objects of :class:`Schedule` are evaluated from the
``num_batches_tracked`` tensor with tensor operations, on its device: no host
synchronisation, no graph break under ``torch.compile(fullgraph=True)``, the
same value in eager and compiled code. They are plain objects, so a model that
holds them pickles, deep-copies and round-trips through ``torch.save``.
"""

from typing import Union

import torch
from torch import Tensor


class Schedule:
    """Base class of the r_max / d_max schedules that BatchRenorm*d evaluates
    on the device, inside the graph.

    A subclass implements :meth:`value` (the limit at a step given as a Python
    int, for inspection and plotting) and :meth:`evaluate` (the same from the
    step as an int64 tensor, with tensor operations only, returning a 0-dim
    float64 tensor on the step's device). Calling the object dispatches on
    the argument's type. Any other callable of an int is still accepted by
    BatchRenorm*d, at the cost of a host synchronisation per step.
    """

    def value(self, step: int) -> float:
        raise NotImplementedError

    def evaluate(self, step: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, step: Union[int, Tensor]) -> Union[float, Tensor]:
        if isinstance(step, Tensor):
            return self.evaluate(step)
        return self.value(int(step))


class LinearRamp(Schedule):
    """``start`` up to step ``begin_step``, then linear to ``end`` at step
    ``end_step``, then ``end``.

    The device evaluation computes ``start + (end - start) * (step - begin) /
    (end_step - begin)`` in float64, the host formula operation for
    operation, so the two agree exactly.
    """

    def __init__(self, start: float, end: float, begin_step: int, end_step: int) -> None:
        if begin_step < 0 or end_step < begin_step:
            raise ValueError(
                f"expected 0 <= begin_step <= end_step, got begin_step={begin_step}, "
                f"end_step={end_step}"
            )
        self.start = float(start)
        self.end = float(end)
        self.begin_step = int(begin_step)
        self.end_step = int(end_step)

    def value(self, step: int) -> float:
        if step <= self.begin_step:
            return self.start
        if step >= self.end_step:
            return self.end
        return self.start + (self.end - self.start) * (step - self.begin_step) / (
            self.end_step - self.begin_step
        )

    def evaluate(self, step: Tensor) -> Tensor:
        length = max(self.end_step - self.begin_step, 1)
        into = (step - self.begin_step).clamp(0, length).to(torch.float64)
        ramp = self.start + (self.end - self.start) * into / length
        # The ends exactly, as value() returns them (the start first where
        # begin_step == end_step).
        ramp = torch.where(step >= self.end_step, self.end, ramp)
        return torch.where(step <= self.begin_step, self.start, ramp)

    def __repr__(self) -> str:
        return (
            f"LinearRamp(start={self.start}, end={self.end}, begin_step={self.begin_step}, "
            f"end_step={self.end_step})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LinearRamp) and vars(self) == vars(other)


def renorm_schedule(
    warmup_steps: int = 5000,
    r_max: float = 3.0,
    r_max_steps: int = 40000,
    d_max: float = 5.0,
    d_max_steps: int = 25000,
) -> tuple[LinearRamp, LinearRamp]:
    """Return ``(r_max_schedule, d_max_schedule)`` for BatchRenorm*d's r_max and d_max.

    Both keep the layer at Batch Norm (r_max = 1, d_max = 0) for the first
    ``warmup_steps`` steps, then grow linearly to ``r_max`` at step
    ``r_max_steps`` and ``d_max`` at step ``d_max_steps``, and stay there. The
    defaults are the paper's: 5000, 3 at 40k, 5 at 25k. The step is the
    layer's ``num_batches_tracked`` before the step.

    The schedules are :class:`LinearRamp` objects: the layer evaluates them on
    the device from ``num_batches_tracked`` (no host synchronisation, no
    graph break under ``torch.compile``), and they pickle. Called with an
    int they return the value as a float: ``r_max_schedule(12500)`` is 1 + 2 * 7500 / 35000.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not r_max >= 1.0:
        raise ValueError(f"r_max must be >= 1, got {r_max}")
    if not d_max >= 0.0:
        raise ValueError(f"d_max must be >= 0, got {d_max}")
    for name, steps in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
        if steps < warmup_steps:
            raise ValueError(f"{name} must be >= warmup_steps ({warmup_steps}), got {steps}")
    return (
        LinearRamp(1.0, float(r_max), warmup_steps, r_max_steps),
        LinearRamp(0.0, float(d_max), warmup_steps, d_max_steps),
    )
