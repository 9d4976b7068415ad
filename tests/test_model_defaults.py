"""Model configs set method defaults (configs/model/*.yaml, ``attention:`` section); the user's flags override them."""

import pytest

from vdit_sparse.generate import GenerateRequest, resolve, run_settings, run_spec


def settings_of(**kw):
    req = GenerateRequest(prompt="a red square moving right", **kw)
    return run_settings(resolve(req), req)


def test_the_long_models_tileskip_block_size_applies_only_with_tileskip():
    assert settings_of(model="tiny-long", cache="tileskip").block_size == 32
    assert settings_of(model="tiny-long", attention="svg", cache="tileskip").block_size == 32
    assert settings_of(model="tiny-long").block_size == 64  # no tile-skip: the method's own default
    assert settings_of(model="tiny", cache="tileskip").block_size == 64  # the short model sets nothing


def test_the_long_models_tileskip_threshold_applies_and_the_users_wins():
    def threshold(**kw):
        req = GenerateRequest(prompt="a red square moving right", **kw)
        return run_spec(resolve(req), req).tileskip.threshold

    assert threshold(model="tiny-long", cache="tileskip") == -1
    assert threshold(model="tiny", cache="tileskip") == pytest.approx(-14.4)  # the method's published default
    assert threshold(model="tiny-long", cache="tileskip", settings={"threshold": -3.0}) == -3.0
    assert threshold(model="tiny-long", cache="tileskip", overrides=("tileskip.threshold=-2",)) == -2


@pytest.mark.parametrize("how", ["flag", "hydra"])
def test_the_users_setting_overrides_the_models_default(how):
    if how == "flag":
        s = settings_of(model="tiny-long", cache="tileskip", settings={"block_size": 16})
    else:
        s = settings_of(model="tiny-long", cache="tileskip", overrides=("attention.block_size=16",))
    assert s.block_size == 16


def test_the_sidecar_records_the_models_defaults_and_the_settings_used(tmp_path, monkeypatch):
    import json

    from vdit_sparse.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a red square moving right", "--model", "tiny-long", "--random-weights", "--cache",
                 "tileskip", "--steps", "1", "--frames", "5", "--height", "32", "--width", "32", "--out", "v.mp4"]) == 0
    side = json.loads((tmp_path / "v.json").read_text())
    assert side["config"]["model_method_defaults"] == {"block_size": 32, "threshold": -1}
    assert side["config"]["settings"]["block_size"] == 32
    assert side["weights"] == {"source": "random (--random-weights)", "trained": False, "sha256": None}
