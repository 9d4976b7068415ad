"""The compiled kernel on a real GPU (marker ``gpu``: run on the device machine with ``pytest -m gpu tests/kernels``).

Every launch candidate is checked for accuracy: on H100 one tile config of a similar kernel gave NaN.
"""

import pytest
import torch

from vdit_sparse.kernels import autotune_cache as ac
from vdit_sparse.kernels import block_sparse_attention
from vdit_sparse.kernels.reference import reference_attention, reference_tile_stats
from vdit_sparse.plan import from_block_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("cfg", ac.CANDIDATES, ids=lambda c: "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}".format(**c))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_every_candidate_config_is_accurate(kit, gen, cfg, dtype, D):
    N = 1000
    plan = kit.make_plan("segments", 1, 2, N, gen).to("cuda")
    q, k, v = kit.make_qkv(1, 2, N, D, dtype, gen, device="cuda")
    skip = (torch.rand(plan.kv_index.shape, generator=gen) < 0.2).cuda()
    out, stats = block_sparse_attention(
        q, k, v, plan, backend="triton", config=cfg, skip=skip, tile_stats=True, out=kit.poisoned(q),
    )
    ref = reference_attention(q.float(), k.float(), v.float(), plan.drop(skip))
    assert kit.rel_l2(out, ref) < 1e-2
    ref_stats = reference_tile_stats(q.float().cpu(), k.float().cpu(), plan.to("cpu"), skip=skip.cpu())
    assert torch.equal(stats.isinf().cpu(), ref_stats.isinf())
    finite = ref_stats.isfinite()
    torch.testing.assert_close(stats.cpu()[finite], ref_stats[finite], atol=2e-2, rtol=0)


def test_auto_backend_tunes_once_into_the_cache_dir(kit, gen, tmp_path, monkeypatch):
    monkeypatch.setenv("VDIT_SPARSE_CACHE_DIR", str(tmp_path))
    N = 2048
    mask = (torch.rand(1, 2, N // 128, N // 128, generator=gen) < 0.3).cuda()
    q, k, v = (t.transpose(1, 2) for t in kit.make_qkv(1, N, 2, 128, torch.bfloat16, gen, device="cuda"))
    out = block_sparse_attention(q, k, v, mask, block_size=(128, 128))
    assert (tmp_path / ac.CACHE_FILE).exists()
    plan = from_block_mask(mask, (128, 128), N)
    assert kit.rel_l2(out, reference_attention(q.float(), k.float(), v.float(), plan)) < 1e-2
