"""ODE integration of a velocity field from t = 0 to t = 1 (flow-matching samplers).

Written here because torchdiffeq / torchcfm are not dependencies (and the fixed-step solvers are a few
lines); the adaptive solver is SciPy's RK45 (Dormand–Prince) on the flattened state.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x (B, ...), t (B,)) -> v (B, ...)

SOLVERS = ("euler", "midpoint", "rk45")


def _t(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


@torch.no_grad()
def integrate(velocity: Velocity, x0: torch.Tensor, *, steps: int = 100, solver: str = "midpoint",
              rtol: float = 1e-4, atol: float = 1e-4) -> tuple[torch.Tensor, int]:
    """Solve ``dx/dt = velocity(x, t)`` from ``x(0) = x0`` to ``t = 1``.

    Parameters
    ----------
    velocity
        ``(x (B, ...), t (B,)) -> (B, ...)``.
    x0
        Initial state ``(B, ...)``.
    steps
        Fixed steps of ``"euler"`` / ``"midpoint"`` (ignored by ``"rk45"``).
    solver
        ``"euler"`` (1 evaluation per step), ``"midpoint"`` (2, second order) or ``"rk45"`` (adaptive
        Dormand–Prince through :func:`scipy.integrate.solve_ivp`, tolerances ``rtol`` / ``atol``).

    Returns
    -------
    ``x(1)`` with the shape of ``x0``, and the number of velocity evaluations.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {list(SOLVERS)}.")
    if solver != "rk45" and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    x = x0.clone()
    if solver == "euler":
        h = 1.0 / steps
        for i in range(steps):
            x = x + h * velocity(x, _t(x, i * h))
        return x, steps
    if solver == "midpoint":
        h = 1.0 / steps
        for i in range(steps):
            mid = x + 0.5 * h * velocity(x, _t(x, i * h))
            x = x + h * velocity(mid, _t(x, (i + 0.5) * h))
        return x, 2 * steps
    from scipy.integrate import solve_ivp

    shape, device, dtype = x0.shape, x0.device, x0.dtype

    def f(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.as_tensor(y, dtype=dtype, device=device).reshape(shape)
        return velocity(xt, _t(xt, t)).reshape(-1).double().cpu().numpy()

    sol = solve_ivp(f, (0.0, 1.0), x0.reshape(-1).double().cpu().numpy(), method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"The adaptive ODE solver failed: {sol.message}")
    return torch.as_tensor(sol.y[:, -1], dtype=dtype, device=device).reshape(shape), int(sol.nfev)
