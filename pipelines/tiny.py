"""The embedded default model: a small WanPipeline built offline from the real diffusers classes.

When trained weights ship in ``vdit_sparse/data/tiny`` (see the embedded-model issue) they load
through ``from_pretrained``; otherwise the pipeline is created deterministically from a fixed seed
with random weights, which exercises every code path but draws noise, not shapes.
"""

from __future__ import annotations

import warnings
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


def packaged_weights_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "vdit_sparse" / "data" / "tiny"


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


def build_tiny_pipeline(seed: int = SEED):
    """The embedded default WanPipeline: trained weights when shipped, else random from ``seed``."""
    from diffusers import WanPipeline

    from diffusers.utils import logging as diffusers_logging

    weights = packaged_weights_dir()
    if (weights / "model_index.json").exists():
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # WanPipeline warns that its vae is not an AutoencoderKLWan: ours is meant
        try:
            return WanPipeline.from_pretrained(weights)
        finally:
            diffusers_logging.set_verbosity(level)
    warnings.warn(f"no trained weights in {weights}: the tiny model has random weights and draws noise "
                  "(scripts/train_tiny.py trains them)", stacklevel=2)
    return WanPipeline(**build_components(seed))
