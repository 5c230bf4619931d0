"""The r_max / d_max warm-up of the Batch Renorm paper (Ioffe, 2017, section 4)."""

from typing import Callable, Tuple


def _ramp(start: float, end: float, begin_step: int, end_step: int) -> Callable[[int], float]:
    def value(step: int) -> float:
        if step <= begin_step:
            return start
        if step >= end_step:
            return end
        return start + (end - start) * (step - begin_step) / (end_step - begin_step)

    return value


def renorm_schedule(
    warmup_steps: int = 5000,
    r_max: float = 3.0,
    r_max_steps: int = 40000,
    d_max: float = 5.0,
    d_max_steps: int = 25000,
) -> Tuple[Callable[[int], float], Callable[[int], float]]:
    """Return ``(r_max_fn, d_max_fn)``, functions of the step count (the layer's
    num_batches_tracked), for BatchRenorm*d's r_max and d_max.

    Both keep the layer at Batch Norm (r_max = 1, d_max = 0) for the first
    ``warmup_steps`` steps, then grow linearly to ``r_max`` at step
    ``r_max_steps`` and ``d_max`` at step ``d_max_steps``, and stay there. The
    defaults are the paper's: 5000, 3 at 40k, 5 at 25k.
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
        _ramp(1.0, float(r_max), warmup_steps, r_max_steps),
        _ramp(0.0, float(d_max), warmup_steps, d_max_steps),
    )
