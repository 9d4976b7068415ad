import pytest

from vdit_sparse import Params


@pytest.mark.parametrize("key, value, match", [
    ("density", 0.0, r"density=0.0: must be a number in \(0, 1\]"),
    ("density", 1.5, "density=1.5"),
    ("top_p", -0.1, "top_p"),
    ("warmup_steps", -1, "warmup_steps"),
    ("dense_layers", "two", "dense_layers"),
    ("threshold", 2.0, "threshold"),
    ("num_q_clusters", 0, "num_q_clusters"),
])
def test_bad_values_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        Params().updated(**{key: value})


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown parameter sparsity: known parameters are density"):
        Params().updated(sparsity=0.5)


def test_good_values_pass_through():
    p = Params().updated(density=0.2, dense_layers=[0, 3], warmup_steps=0.25)
    assert (p.density, p.dense_layers, p.warmup_steps) == (0.2, [0, 3], 0.25)
