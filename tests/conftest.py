import os
import random
import zlib

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def seed(request):
    """Every test's seed, printed (pytest shows it with a failure) and set on torch's, numpy's and random's
    global generators: stable per test (from its name), so CI is repeatable; ``VDIT_SPARSE_TEST_SEED=N``
    runs every test with seed N instead."""
    value = int(os.environ.get("VDIT_SPARSE_TEST_SEED") or zlib.crc32(request.node.nodeid.encode()) % 2**31)
    print(f"seed={value}")
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


@pytest.fixture(scope="session")
def tiny_pipe():
    """The embedded pipeline, built once per session (tests must not leave it accelerated)."""
    from vdit_sparse.loading import load_pipeline

    pipe = load_pipeline("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_tiny(pipe, seed=0, steps=2, frames=9, size=64, **kw):
    """A small, fast run of the tiny pipeline: (T, H, W, 3) float frames (9 frames at 64 px: 3 x 4 x 4 tokens)."""
    out = pipe(
        prompt=kw.pop("prompt", "a red square moving right"), num_frames=frames, height=size, width=size,
        num_inference_steps=steps, max_sequence_length=16, generator=torch.Generator().manual_seed(seed),
        output_type="np", **kw,
    )
    return out.frames[0]
