"""ODE solvers of the flow's sampling."""

from __future__ import annotations

import pytest
import torch

from spatia.nn import integrate


def test_ode_solvers():
    x0 = torch.ones(2, 3)
    exact = torch.exp(torch.tensor(-1.0))
    errs = {}
    for solver in ("euler", "midpoint", "rk45"):
        x1, nfe = integrate(lambda x, t: -x, x0, steps=10, solver=solver)
        errs[solver] = float((x1 - exact).abs().max())
    assert errs["midpoint"] < errs["euler"] / 10 and errs["rk45"] < 1e-3 and errs["euler"] < 0.03
    with pytest.raises(ValueError, match="Unknown solver"):
        integrate(lambda x, t: -x, x0, solver="heun")
