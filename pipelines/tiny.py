"""The embedded models: small WanPipelines built offline from the real diffusers classes.

``tiny`` (448 tokens) and ``tiny-long`` (1,600 tokens, fine-tuned from it at 97 frames) ship trained in
``vdit_sparse/data/<name>`` and load through ``from_pretrained``. Random weights (deterministic from a seed;
they exercise every code path but draw noise) only when asked for.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# Words of the procedural shapes world; anything else maps to [UNK].
VOCAB_WORDS = (
    "a an the and with on in of to is two one moving move moves still static staying right left up down "
    "red green blue yellow orange purple white black cyan magenta pink gray grey "
    "square circle triangle squares circles triangles ball box star "
    "background plain textured striped checkered dark light small big large object objects"
).split()

TEXT_DIM = 32
MAX_TEXT_TOKENS = 16  # captions of the shapes world are short
SEED = 0

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=6,
    attention_head_dim=32,  # a head size the Triton kernel takes (16, 32, 64, 128)
    in_channels=16,  # the VAE's latent statistics have 16 entries
    out_channels=16,
    text_dim=TEXT_DIM,
    freq_dim=64,
    ffn_dim=512,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=64,
)

# A fitted patch PCA (pipelines/patch_vae.py): 8 x 8 pixels x 4 frames x RGB -> 16 channels. At 128 x 128
# and 25 frames: 7 latent frames x 16 x 16, i.e. 7 x 8 x 8 = 448 video tokens at the DiT's patch (1, 2, 2).
VAE_CONFIG = dict(z_dim=16, patch_size=8, patch_frames=4)

TEXT_ENCODER_CONFIG = dict(
    d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
)


# The embedded models: name -> the folder under vdit_sparse/data/ that holds its trained pipeline.
EMBEDDED = ("tiny", "tiny-long")


def packaged_weights_dir(name: str = "tiny") -> Path:
    """vdit_sparse/data/<name> of this installation, whatever its kind (regular, editable, wheel, source tree):
    found from the imported package itself, never from this file's place (pipelines/ sits elsewhere in a checkout)."""
    import vdit_sparse

    return Path(vdit_sparse.__file__).resolve().parent / "data" / name


@functools.cache  # the shipped files do not change while a process runs; compare calls this once per run
def weights_info(name: str) -> dict:
    """What the sidecar records about an embedded model's weights: where they are, whether they are trained
    (a shipped pipeline directory exists) and the SHA-256 of its transformer weights."""
    import hashlib

    folder = packaged_weights_dir(name)
    trained = (folder / "model_index.json").is_file()
    sha = None
    if trained:
        digest = hashlib.sha256()
        for f in sorted((folder / "transformer").glob("*.safetensors")):
            digest.update(f.read_bytes())
        sha = digest.hexdigest()
    return {"source": str(folder), "trained": trained, "sha256": sha}


def embedded_size_rule() -> tuple[int, int, int]:
    """(t, s, most) of the embedded models, known without loading them: 4k + 1 frames (the autoencoder's 4-frame
    patches), sides a multiple of 16 (8-pixel patches x the DiT's 2 x 2), and at most ``most`` latent positions
    per axis (the rotary table's length)."""
    return VAE_CONFIG["patch_frames"], VAE_CONFIG["patch_size"] * TRANSFORMER_CONFIG["patch_size"][1], \
        TRANSFORMER_CONFIG["rope_max_seq_len"]


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` outside the embedded models' vocabulary (they read as [UNK])."""
    import re

    known = set(VOCAB_WORDS)
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", prompt.lower()) if w not in known))


def build_tokenizer():
    """A word-level fast tokenizer over the shapes world's words, built in code (nothing downloaded)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in VOCAB_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=MAX_TEXT_TOKENS
    )


def build_components(seed: int = SEED) -> dict:
    """Every component of the tiny WanPipeline, random weights drawn from ``seed``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .patch_vae import PatchPCAAutoencoder

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG)).eval()
    torch.manual_seed(seed + 1)
    vae = PatchPCAAutoencoder(**VAE_CONFIG).eval()  # unfitted: the first 16 axes of patch space
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny_pipeline(name: str = "tiny", random_weights: bool = False, seed: int = SEED):
    """The embedded WanPipeline ``name`` with its shipped trained weights; random weights from ``seed`` only when
    asked for (``random_weights=True``: tests, or ``--random-weights``), since they draw noise."""
    from diffusers import WanPipeline
    from diffusers.utils import logging as diffusers_logging

    from ..errors import UserError

    if name not in EMBEDDED:
        raise UserError(f"model={name!r}: not an embedded model; embedded: {', '.join(EMBEDDED)}")
    if random_weights:
        return WanPipeline(**build_components(seed))
    weights = packaged_weights_dir(name)
    if not (weights / "model_index.json").exists():
        raise UserError(f"model={name!r}: no trained weights in {weights} (a broken install?); reinstall "
                        "vdit-sparse, or pass --random-weights (random_weights=True) for a model that draws noise")
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # WanPipeline warns that its vae is not an AutoencoderKLWan: ours is meant
    try:
        return WanPipeline.from_pretrained(weights)
    finally:
        diffusers_logging.set_verbosity(level)
