"""benchmarks/fleet_crossover.py: the quality price and the break-even it reports, checked by hand."""
import pytest

from kintsugi.benchmarks import fleet_crossover as X
from kintsugi.benchmarks import fleet_model as FM

RDV = {"models": {"a+b*N": {"a": 0.01, "b": 0.001}}, "best": "a+b*N"}


def test_the_measured_price_is_the_excess_over_the_curves_slope():
    # CheckFree: 1.436 / (1 - 0.059) = 1.52604 at step 900 -> slope (1.52604 - 1.436) / 300 = 3.0012e-4
    # per step; 0.188 / 3.0012e-4 = 626.4 steps.
    assert X.measured_price_steps()["checkfree"] == pytest.approx(626.4, abs=0.1)


def test_at_the_break_even_price_checkfree_ties_with_peer_and_with_checkpoint_restart():
    inp = FM.Inputs(rdv=RDV, stages=X.STAGES)
    c = X.cell(inp, 7e9, 1e-3, X.measured_price_steps())
    for against, key in (("peer", "vs_peer"), ("checkpoint", "vs_checkpoint")):
        price = c["break_even_price_steps"][key]
        tie = X.cell(inp, 7e9, 1e-3, {"checkfree": price, "checkfree_plus": price})
        assert tie["goodput"]["checkfree"] == pytest.approx(tie["goodput"][against], abs=1e-9)


def test_peer_pays_the_stage_state_over_the_link_and_checkfree_the_neighbours_weights():
    # 8e9 parameters, S = 8: a stage is 1e9 parameters; 16 B at 10 Gbit/s = 12.8 s, 4 B = 3.2 s.
    inp = FM.Inputs(rdv=RDV, stages=X.STAGES)
    pf = X.per_failure(inp, 8e9)
    assert pf["d_peer_s"] - pf["d_checkfree_s"] == pytest.approx(12.8 - 3.2)
