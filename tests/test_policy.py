import pytest

from vdit_sparse.caches import TileSkip
from vdit_sparse.policy import Policy
from vdit_sparse.methods import settings_for


def test_fractional_warmup_counts_steps():
    pol = Policy.build("svg", settings_for("svg", {"warmup_steps": 0.25}))
    assert [pol.resolve(0, s, 8)[0] for s in range(8)] == ["dense"] * 2 + ["svg"] * 6


def test_count_warmup_and_dense_layers():
    pol = Policy.build("svg2", settings_for("svg2", {"warmup_steps": 3, "dense_layers": 2}))
    assert pol.resolve(5, 2, 10)[0] == "dense"
    assert pol.resolve(1, 9, 10)[0] == "dense"
    assert pol.resolve(2, 3, 10)[0] == "svg2"


def test_dense_layer_list_and_per_layer_overrides():
    base = settings_for("svg2", {"dense_layers": [0, 3], "warmup_steps": 2})
    pol = Policy.build("svg2", base, table={1: {"density": 0.1}, 2: {"attention": "svg"}})
    assert pol.resolve(3, 5, 10)[0] == "dense"
    method, settings, _ = pol.resolve(1, 5, 10)
    assert method == "svg2" and settings.density == 0.1
    method, settings, _ = pol.resolve(2, 5, 10)
    assert method == "svg" and settings.density == 0.25 and settings.warmup_steps == 2  # svg's own default, the run's warm-up
    assert pol.resolve(4, 5, 10)[1].density is None


def test_bad_table_entries_are_named():
    base = settings_for("svg", {})
    with pytest.raises(ValueError, match="tuned table: layer 1: top_p: not a setting of attention='svg'"):
        Policy.build("svg", base, table={1: {"top_p": 0.5}})
    with pytest.raises(ValueError, match="tuned table: layer 2: attention='nope': unknown method"):
        Policy.build("svg", base, table={2: {"attention": "nope"}})
    with pytest.raises(ValueError, match="layer 3 must map to a dict"):
        Policy.build("svg", base, table={3: 0.2})


def test_fraction_without_step_count_is_a_clear_error():
    with pytest.raises(ValueError, match="needs the number of steps"):
        Policy.build("svg", settings_for("svg", {"warmup_steps": 0.5})).resolve(0, 0, None)


def test_forced_dense_calls_skip_the_cache():
    pol = Policy.build("svg", settings_for("svg", {"warmup_steps": 1}, "tileskip"), cache="tileskip")
    assert pol.resolve(0, 0, 4)[2] is None  # a warm-up step: dense, no tile-skip
    assert pol.resolve(0, 1, 4)[2] == TileSkip()
    assert Policy.build("svg", settings_for("svg"), cache="tileskip+magcache").resolve(0, 3, 4)[2] == TileSkip()
    assert Policy.build("svg", settings_for("svg"), cache="magcache").resolve(0, 3, 4)[2] is None


def test_a_tables_per_layer_threshold_sets_that_layers_tileskip_cache_only():
    run = TileSkip(threshold=-10.0, refresh_every=3)
    pol = Policy.build("svg", settings_for("svg", {"warmup_steps": 0}), "tileskip", {1: {"threshold": -4.0}}, run)
    assert pol.resolve(0, 2, 4)[2] == run
    assert pol.resolve(1, 2, 4)[2] == TileSkip(threshold=-4.0, refresh_every=3)
    assert pol.resolve(1, 2, 4)[1] == pol.settings  # the method's settings are untouched
    with pytest.raises(ValueError, match=r"layer 1: threshold: a tile-skip setting, used only with cache='tileskip'"):
        Policy.build("svg", settings_for("svg"), "none", {1: {"threshold": -4.0}})
    with pytest.raises(ValueError, match=r"layer 1: threshold=1.0: must be a log2-space bound"):
        Policy.build("svg", settings_for("svg"), "tileskip", {1: {"threshold": 1.0}})


def test_a_tables_per_layer_warmup_and_dense_layers_are_honoured():
    """They were accepted and ignored: {1: {warmup_steps: 4}} still ran layer 1 sparse at step 2."""
    base = settings_for("svg", {"warmup_steps": 1})
    pol = Policy.build("svg", base, table={1: {"warmup_steps": 4}, 2: {"dense_layers": [2]}, 3: {"warmup_steps": 0}})
    assert [pol.resolve(0, s, 10)[0] for s in range(5)] == ["dense"] + ["svg"] * 4  # the run's warm-up
    assert [pol.resolve(1, s, 10)[0] for s in range(5)] == ["dense"] * 4 + ["svg"]  # its own, longer one
    assert {pol.resolve(2, s, 10)[0] for s in range(10)} == {"dense"}  # a dense layer by its own entry
    assert pol.resolve(3, 0, 10)[0] == "svg"  # no warm-up of its own
