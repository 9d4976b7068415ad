"""Typed settings: one class per method, the only home of defaults and checks, the same from every entry."""

import pytest

from vdit_sparse.methods import METHODS
from vdit_sparse.methods.svg import SVGSettings
from vdit_sparse.methods.svg2 import SVG2Settings
from vdit_sparse.methods import settings_for
from vdit_sparse.caches import TileSkip, tileskip_settings


@pytest.mark.parametrize("method, key, value, match", [
    ("svg", "density", 0.0, r"density=0.0: must be a number in \(0, 1\]"),
    ("svg", "density", 1.5, "density=1.5"),
    ("svg2", "top_p", -0.1, "top_p"),
    ("svg", "warmup_steps", -1, "warmup_steps"),
    ("svg", "warmup_steps", 2.5, "a value >= 1 is a count"),
    ("svg2", "dense_layers", "two", "dense_layers"),
    ("svg2", "num_q_clusters", 0, "num_q_clusters"),
    ("svg", "first_frame_sink", "yes", "first_frame_sink"),
    ("svg", "density", float("nan"), "density=nan"),
])
def test_bad_values_are_named(method, key, value, match):
    with pytest.raises(ValueError, match=match):
        settings_for(method, {key: value})


def test_threshold_is_a_log2_bound_and_needs_the_cache():
    with pytest.raises(ValueError, match="log2-space bound"):
        settings_for("dense", {"threshold": 2.0}, "tileskip")
    with pytest.raises(ValueError, match="threshold: a tile-skip setting, used only with cache='tileskip'"):
        settings_for("svg", {"threshold": -10.0})
    assert TileSkip().threshold == pytest.approx(-10 / 0.6931471805599453, abs=0.05)


def test_the_tileskip_knobs_are_the_caches_not_a_methods():
    """0.3: threshold and refresh_every left every method's settings for the one typed TileSkip."""
    for method in METHODS:
        assert not {"threshold", "refresh_every"} & set(METHODS[method].Settings.names())
    assert settings_for("svg", {"threshold": -3.0, "density": 0.3}, "tileskip") == settings_for("svg", {"density": 0.3})
    with pytest.raises(ValueError, match="tileskip.nope: not a setting of the tile-skip cache"):
        tileskip_settings("tileskip", {"nope": 1})


def test_a_setting_the_method_does_not_use_names_the_ones_it_has():
    with pytest.raises(ValueError, match="top_p: not a setting of attention='svg'; its settings are .*density"):
        settings_for("svg", {"top_p": 0.5})
    with pytest.raises(ValueError, match="sparsity: not a setting of attention='svg2'"):
        settings_for("svg2", {"sparsity": 0.5})
    with pytest.raises(ValueError, match="density: not a setting of attention='dense'"):
        settings_for("dense", {"density": 0.5})


def test_good_values_pass_through_and_lists_become_tuples():
    s = settings_for("svg2", {"density": 0.2, "dense_layers": [0, 3], "warmup_steps": 0.25})
    assert isinstance(s, SVG2Settings) and (s.density, s.dense_layers, s.warmup_steps) == (0.2, (0, 3), 0.25)
    assert s.changed() == {"density": 0.2, "dense_layers": (0, 3)}  # warmup 0.25 is svg2's default


def test_each_method_declares_settings_summary_and_knobs():
    for name, method in METHODS.items():
        assert method.name == name and method.Settings.method == name and method.summary
        assert set(method.knobs) <= set(method.Settings.names())
        assert all(method.Settings.help()[k] for k in method.Settings.names())
    assert SVGSettings().density == 0.25 and SVGSettings().warmup_steps == 0.25
