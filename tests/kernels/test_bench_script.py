"""The GPU benchmark's mask builders (the benchmark itself needs a GPU): densities and FlexAttention's view."""

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    from vdit_sparse.bench import kernels

    return kernels


@pytest.mark.parametrize("density", [0.3, 0.15, 0.08])
def test_masks_reach_the_asked_density(bench, density):
    nb = 256  # Wan 1.3B 480p: ceil(32760 / 128)
    rnd = bench.random_mask(2, nb, density, torch.Generator().manual_seed(0), device="cpu")
    band = bench.banded_mask(2, nb, density, device="cpu")
    assert abs(rnd.float().mean().item() - density) < 2 / nb
    assert density <= band.float().mean().item() < density + 3 / nb  # the smallest band reaching it
    assert (rnd.sum(-1) == rnd.sum(-1)[..., :1]).all()  # every query block keeps the same count


def test_flex_block_mask_holds_the_same_blocks(bench):
    pytest.importorskip("torch.nn.attention.flex_attention")
    n, nb = 1000, 8  # N not a multiple of 128
    mask = bench.random_mask(2, nb, 0.4, torch.Generator().manual_seed(1), device="cpu")
    bm = bench.flex_block_mask(mask, n)
    assert torch.equal(bm.to_dense().bool(), mask)
