import numpy as np
import pytest

from vdit_sparse.errors import UserError
from vdit_sparse.loading import load_pipeline

from .conftest import run_tiny


def test_tiny_is_deterministic(tiny_pipe):
    again = load_pipeline("tiny", device="cpu")
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(run_tiny(again, steps=1), run_tiny(tiny_pipe, steps=1))


def test_saved_pipeline_loads_through_from_pretrained(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = load_pipeline(str(tmp_path / "pipe"), device="cpu")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "WanPipeline"
    assert np.allclose(run_tiny(loaded, steps=1), run_tiny(tiny_pipe, steps=1), atol=1e-6)


@pytest.mark.parametrize("name, match", [
    ("/no/such/dir", "not a diffusers pipeline directory"),
    ("./relative-missing", "not a diffusers pipeline directory"),
])
def test_missing_local_model_is_one_line(name, match):
    with pytest.raises(UserError, match=match) as err:
        load_pipeline(name)
    assert "\n" not in str(err.value)


def test_unreachable_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hugging Face cache") as err:
        load_pipeline("nobody/no-such-model")
    assert "\n" not in str(err.value)


def test_bad_device_and_dtype_are_named():
    with pytest.raises(UserError, match="dtype='float8'"):
        load_pipeline("tiny", dtype="float8")
    with pytest.raises(UserError, match="device="):
        load_pipeline("tiny", device="tpu:9")
