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


def test_the_long_model_loads_and_makes_a_clip_of_its_shape_in_two_steps():
    """tiny-long: the tiny model fine-tuned at 97 frames (25 latent frames x 64 = 1,600 tokens per attention call);
    its config's defaults give that shape with no flag."""
    from vdit_sparse.generate import GenerateRequest, run_generation
    from vdit_sparse.pipelines.tiny import weights_info

    assert weights_info("tiny-long")["trained"], "vdit_sparse/data/tiny-long must hold the trained model"
    result = run_generation(GenerateRequest(prompt="a red square moving right", model="tiny-long", steps=2), progress=False)
    assert result.frames.shape == (97, 128, 128, 3)
    assert result.config["weights"]["trained"] and "tiny-long" in result.config["weights"]["source"]
    assert weights_info("tiny-long")["sha256"] != weights_info("tiny")["sha256"]  # its own fine-tuned weights
