"""The shipped embedded model: its weights load from the package and it draws what the prompt asks."""

import numpy as np

from vdit_sparse.pipelines.tiny import packaged_weights_dir
from vdit_sparse.quality.prompt_following import prompt_following

from .conftest import run_tiny


def test_the_trained_weights_ship_and_load_without_the_random_fallback(tiny_pipe, recwarn):
    from vdit_sparse.loading import load_pipeline
    from vdit_sparse.pipelines.patch_vae import PatchPCAAutoencoder

    assert (packaged_weights_dir() / "model_index.json").is_file(), "vdit_sparse/data/tiny must hold the trained model"
    pipe = load_pipeline("tiny", device="cpu")
    assert isinstance(pipe.vae, PatchPCAAutoencoder) and pipe.vae.config.latents_std[0] != 1.0  # fitted, not the stub
    assert not [w for w in recwarn if "random weights" in str(w.message)]


def test_a_clip_at_the_defaults_shows_the_colour_the_prompt_asks(tiny_pipe):
    for prompt, colour in (("a red square moving right", "red"), ("two blue circles staying still on a plain background", "blue")):
        frames = run_tiny(tiny_pipe, prompt=prompt, steps=10, frames=25, size=128, guidance_scale=5.0)
        found = prompt_following((frames * 255).round().astype(np.uint8), prompt)
        assert found["detected_colour"] == colour, (prompt, found)
