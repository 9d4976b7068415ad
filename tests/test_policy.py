import pytest

from vdit_sparse import Params
from vdit_sparse.policy import Policy


def test_fractional_warmup_counts_steps():
    pol = Policy("svg", Params().updated(warmup_steps=0.25))
    assert [pol.resolve(0, s, 8)[0] for s in range(8)] == ["dense"] * 2 + ["svg"] * 6


def test_count_warmup_and_dense_layers():
    pol = Policy("svg2", Params().updated(warmup_steps=3, dense_layers=2))
    assert pol.resolve(5, 2, 10)[0] == "dense"
    assert pol.resolve(1, 9, 10)[0] == "dense"
    assert pol.resolve(2, 3, 10)[0] == "svg2"


def test_dense_layer_list_and_per_layer_overrides():
    pol = Policy("svg2", Params().updated(dense_layers=[0, 3]), layers={1: {"density": 0.1}, 2: {"attention": "svg"}})
    assert pol.resolve(3, 5, 10)[0] == "dense"
    method, params, _ = pol.resolve(1, 5, 10)
    assert method == "svg2" and params.density == 0.1
    assert pol.resolve(2, 5, 10)[0] == "svg"
    assert pol.resolve(4, 5, 10)[1].density is None


def test_fraction_without_step_count_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the number of steps"):
        Policy("svg", Params().updated(warmup_steps=0.5)).resolve(0, 0, None)


def test_forced_dense_calls_skip_the_cache():
    pol = Policy("svg", Params().updated(warmup_steps=1), cache="tileskip")
    assert pol.resolve(0, 0, 4)[2] == "none"
    assert pol.resolve(0, 1, 4)[2] == "tileskip"
