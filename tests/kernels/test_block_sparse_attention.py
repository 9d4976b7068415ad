"""block_sparse_attention against the dense-mask reference, on both the Triton and the torch path.

Triton runs through its CPU interpreter here (conftest.py); shapes stay small. Inputs are fresh
random each run (the seed is printed), and outputs are written into NaN-filled buffers, so a row the
kernel forgets to write fails the comparison.
"""

import ast
import importlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vdit_sparse.kernels import block_sparse_attention
from vdit_sparse.kernels.reference import reference_attention, reference_tile_stats
from vdit_sparse.kernels.tiles import query_tiles
from vdit_sparse.layout import VideoLayout
from vdit_sparse.methods import AttentionContext
from vdit_sparse.methods.svg import SVG
from vdit_sparse.methods.svg2 import SVG2
from vdit_sparse.plan import BlockPlan, from_block_mask

BACKENDS = ["triton", "torch"]
TORCH_TILES = {"BLOCK_M": 16, "BLOCK_N": 24}  # small tiles: segments span several tiles even at small N
KINDS = ["blocks", "ragged_n", "perm", "segments"]
SHAPE = {"blocks": 128, "ragged_n": 100, "perm": 120, "segments": 120}  # N per plan kind
B, H, D = 1, 2, 32


def run(kit, backend, q, k, v, plan, skip=None, **kw):
    """The call under test, on the backend's device, into a poisoned buffer; results come back on CPU."""
    if backend == "triton":
        kit.need_triton()
    dev = kit.DEVICE if backend == "triton" else "cpu"
    q, k, v = (t.to(dev) for t in (q, k, v))
    out = kit.poisoned(torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=dev))
    config = None if backend == "triton" else TORCH_TILES
    res = block_sparse_attention(
        q, k, v, plan.to(dev), backend=backend, out=out, config=config,
        skip=None if skip is None else skip.to(dev), **kw,
    )
    got = res[0] if isinstance(res, tuple) else res
    assert got is out  # written in place, in the caller's buffer
    return tuple(t.cpu() for t in res) if isinstance(res, tuple) else res.cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kit, gen, backend, dtype, kind):
    N = SHAPE[kind]
    plan = kit.make_plan(kind, B, H, N, gen)
    plan.validate()
    q, k, v = kit.make_qkv(B, H, N, D, dtype, gen)
    out = run(kit, backend, q, k, v, plan)
    ref = reference_attention(q.float(), k.float(), v.float(), plan)
    assert not out.isnan().any()
    assert kit.rel_l2(out, ref) < kit.TOL[dtype]


def test_fp16_and_small_head_dim(kit, gen):
    N, d = 100, 16
    plan = kit.make_plan("segments", B, H, N, gen)
    q, k, v = kit.make_qkv(B, H, N, d, torch.float16, gen)
    out = run(kit, "triton", q, k, v, plan)
    assert kit.rel_l2(out, reference_attention(q.float(), k.float(), v.float(), plan)) < kit.TOL[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_block_without_keys_gives_zeros(kit, gen, backend):
    N = 150  # not a multiple of the block size either
    mask = torch.rand(B, H, 5, 5, generator=gen) < 0.6
    mask[:, :, 2] = False  # query rows 64..95 attend to nothing
    plan = from_block_mask(mask, (32, 32), N)
    q, k, v = kit.make_qkv(B, H, N, D, torch.bfloat16, gen)
    skip = torch.zeros_like(plan.kv_index, dtype=torch.bool)
    skip[:, 4] = True  # every entry of query block 4 skipped: rows 128..149 get nothing either
    out = run(kit, backend, q, k, v, plan, skip=skip)
    assert not out.isnan().any()
    assert (out[:, :, 64:96] == 0).all() and (out[:, :, 128:] == 0).all()
    assert (out[:, :, :64].abs().sum(-1) > 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_equals_dropped_plan(kit, gen, backend):
    N = 120
    plan = kit.make_plan("segments", B, H, N, gen, density=0.7)
    skip = torch.rand(plan.kv_index.shape, generator=gen) < 0.4
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    out, stats = run(kit, backend, q, k, v, plan, skip=skip, tile_stats=True)
    ref = reference_attention(q, k, v, plan.drop(skip))
    assert kit.rel_l2(out, ref) < 1e-5
    assert (stats[skip] == float("-inf")).all()  # skipped entries were not computed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_tile_stats_match_reference(kit, gen, backend, reverse):
    N = 120
    plan = kit.make_plan("segments", B, H, N, gen, density=0.7)
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    q = q * 3  # sharper attention: stats spread over a wide range
    out, stats = run(kit, backend, q, k, v, plan, tile_stats=True, reverse=reverse)
    ref = reference_tile_stats(q, k, plan, reverse=reverse)
    G, Sq, L = plan.kv_index.shape
    assert stats.shape == (G, Sq, L) and stats.dtype == torch.float32
    assert torch.equal(stats.isinf(), ref.isinf())  # -inf exactly where nothing was computed
    finite = ref.isfinite()
    assert finite.any() and (stats[finite] <= 0).all()
    torch.testing.assert_close(stats[finite], ref[finite], atol=1e-4, rtol=0)
    assert kit.rel_l2(out, reference_attention(q, k, v, plan)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_scanned_entry_has_stat_zero(kit, gen, backend):
    """The first entry scanned sets every row's running max, so its statistic is exactly 0."""
    N = 128
    mask = torch.rand(B, H, 4, 4, generator=gen) < 0.7
    mask[..., 1] = True  # every query block has at least one (non-empty) key block
    plan = from_block_mask(mask, (32, 32), N)
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    last = (plan.kv_count.long() - 1)[..., None]  # (G, Sq, 1)
    _, fwd = run(kit, backend, q, k, v, plan, tile_stats=True)
    _, rev = run(kit, backend, q, k, v, plan, tile_stats=True, reverse=True)
    assert (fwd[..., 0] == 0).all()
    assert (torch.gather(rev, 2, last) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reverse_gives_the_same_output(kit, gen, backend):
    N = 100
    plan = kit.make_plan("segments", B, H, N, gen)
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    fwd = run(kit, backend, q, k, v, plan)
    rev = run(kit, backend, q, k, v, plan, reverse=True)
    assert kit.rel_l2(rev, fwd) < 1e-6


def _to_plan_order(x, perm):
    """(B, H, N, D) with row i of group g = x's row perm[g, i]: a physically permuted copy."""
    B_, H_, N, d = x.shape
    flat = x.reshape(B_ * H_, N, d)
    return torch.gather(flat, 1, perm.long()[..., None].expand(-1, -1, d)).view(B_, H_, N, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permutation_round_trip_is_exact(kit, gen, backend):
    """Gathering inside the kernel equals permuting q, k, v outside, running, and scattering back: bit for bit."""
    N = 100
    plan = kit.make_plan("segments", B, H, N, gen)
    q, k, v = kit.make_qkv(B, H, N, D, torch.bfloat16, gen)
    out, stats = run(kit, backend, q, k, v, plan, tile_stats=True)
    unpermuted = replace(plan, q_perm=None, k_perm=None)
    qp, kp, vp = _to_plan_order(q, plan.q_perm), _to_plan_order(k, plan.k_perm), _to_plan_order(v, plan.k_perm)
    out_p, stats_p = run(kit, backend, qp, kp, vp, unpermuted, tile_stats=True)
    back = torch.empty_like(out_p).view(B * H, N, D)
    back.scatter_(1, plan.q_perm.long()[..., None].expand(-1, -1, D), out_p.view(B * H, N, D))
    assert torch.equal(back.view_as(out), out)
    assert torch.equal(stats, stats_p)
    identity = torch.arange(N, dtype=torch.int32).expand(B * H, N).contiguous()
    same = run(kit, backend, qp, kp, vp, replace(plan, q_perm=identity, k_perm=identity))
    assert torch.equal(same, out_p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_expanded_plan(kit, gen, backend):
    """q, k, v as diffusers' (B, N, H, D) transposed, plan tensors broadcast over heads with stride 0."""
    N, heads = 100, 2
    one = kit.make_plan("segments", 1, 1, N, gen)
    G = 2 * heads
    plan = BlockPlan(
        q_offsets=one.q_offsets.expand(G, -1), k_offsets=one.k_offsets.expand(G, -1),
        kv_count=one.kv_count.expand(G, -1), kv_index=one.kv_index.expand(G, -1, -1), batch=2, heads=heads,
        q_perm=one.q_perm.expand(G, -1), k_perm=one.k_perm.expand(G, -1), num_tokens=N,
    )
    q, k, v = (torch.randn(2, N, heads, D, generator=gen).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    out = run(kit, backend, q, k, v, plan)
    ref = reference_attention(q, k, v, plan)
    assert kit.rel_l2(out, ref) < 1e-5
    dev = kit.DEVICE if backend == "triton" else "cpu"
    strided_out = torch.full((2, N, heads, D), float("nan"), device=dev).transpose(1, 2)  # written in place
    block_sparse_attention(*(t.to(dev) for t in (q, k, v)), plan.to(dev), backend=backend, out=strided_out,
                           config=None if backend == "triton" else TORCH_TILES)
    assert kit.rel_l2(strided_out, ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_mask_form(kit, gen, backend):
    if backend == "triton":
        kit.need_triton()
    N = 100
    mask = torch.rand(B, H, 4, 3, generator=gen) < 0.5
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    dev = kit.DEVICE if backend == "triton" else "cpu"
    q, k, v, mask = (t.to(dev) for t in (q, k, v, mask))
    config = None if backend == "triton" else TORCH_TILES
    out = block_sparse_attention(q, k, v, mask, block_size=(32, 40), backend=backend, config=config)
    plan = from_block_mask(mask, (32, 40), N)
    assert torch.equal(out, block_sparse_attention(q, k, v, plan, backend=backend, config=config))
    assert kit.rel_l2(out, reference_attention(q.cpu(), k.cpu(), v.cpu(), plan.to("cpu"))) < 1e-5


def test_auto_backend_on_cpu_is_the_torch_path(kit, gen):
    N = 96
    plan = kit.make_plan("segments", B, H, N, gen)
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    auto = block_sparse_attention(q, k, v, plan)
    assert torch.equal(auto, block_sparse_attention(q, k, v, plan, backend="torch"))
    assert kit.rel_l2(auto, reference_attention(q, k, v, plan)) < 1e-5
    with pytest.raises(ValueError, match="^backend: 'reference' not supported; allowed: auto, triton, torch$"):
        block_sparse_attention(q, k, v, plan, backend="reference")  # the reference is a test oracle only


ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[tuple[str, ...]]:
    """Every module (and name) ``path`` imports, at the top or inside a function, split at the dots."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {tuple(a.name.split(".")) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = tuple(node.module.split(".")) if node.module else ()
            found |= {base + (a.name,) for a in node.names}
    return found


def test_kernel_modules_import_one_way():
    """The Triton file knows no CPU path, dispatcher or reference; no runtime module imports the reference."""
    forbidden = {"cpu_path", "cpu_masked", "dispatch", "reference"}
    triton_file = _imports(ROOT / "kernels" / "block_sparse_attention.py")
    assert not [m for m in triton_file if forbidden & set(m)], triton_file
    runtime = [p for d in ("kernels", "vdit_sparse", "pipelines") for p in (ROOT / d).rglob("*.py") if p.name != "reference.py"]
    assert len(runtime) > 20
    assert [p.name for p in runtime if any("reference" in m for m in _imports(p))] == []


def _bad_calls(kit, gen):
    N = 64
    plan = kit.make_plan("blocks", B, H, N, gen)
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    mask = torch.ones(B, H, 2, 2, dtype=torch.bool)
    return {
        "backend": lambda: block_sparse_attention(q, k, v, plan, backend="cuda"),
        "q: dtype": lambda: block_sparse_attention(q.to(torch.int32), k, v, plan),
        "q, k, v: shapes": lambda: block_sparse_attention(q, k[:, :, :32], v, plan),
        "block_size": lambda: block_sparse_attention(q, k, v, mask),
        "block_mask shape": lambda: block_sparse_attention(q, k, v, mask, block_size=(16, 16)),
        "plan: built for": lambda: block_sparse_attention(q[:, :1], k[:, :1], v[:, :1], plan),
        "plan: built for num_tokens=63": lambda: block_sparse_attention(q, k, v, replace(plan, num_tokens=63)),
        "plan.kv_index": lambda: block_sparse_attention(q, k, v, replace(plan, kv_index=plan.kv_index.long())),
        "skip": lambda: block_sparse_attention(q, k, v, plan, skip=torch.zeros(3, dtype=torch.bool)),
        "out": lambda: block_sparse_attention(q, k, v, plan, out=torch.empty(1)),
        "head dim 24": lambda: block_sparse_attention(q[..., :24], k[..., :24], v, plan, backend="triton"),
        "config: the Triton kernel": lambda: block_sparse_attention(
            *(t.to(kit.DEVICE) for t in (q, k, v)), plan.to(kit.DEVICE), backend="triton",
            config={"BLOCK_M": 24, "BLOCK_N": 32}),
    }


@pytest.mark.parametrize(
    "name", ["backend", "q: dtype", "q, k, v: shapes", "block_size", "block_mask shape", "plan: built for",
             "plan: built for num_tokens=63", "plan.kv_index", "skip", "out", "head dim 24", "config: the Triton kernel"]
)
def test_bad_arguments_raise_clear_errors(kit, gen, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        _bad_calls(kit, gen)[name]()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("perms", ["q_only", "k_only"])
def test_one_sided_permutation(kit, gen, backend, perms):
    N = 100
    plan = kit.make_plan("segments", B, H, N, gen)
    plan = replace(plan, q_perm=plan.q_perm if perms == "q_only" else None, k_perm=plan.k_perm if perms == "k_only" else None)
    q, k, v = kit.make_qkv(B, H, N, D, torch.float32, gen)
    assert kit.rel_l2(run(kit, backend, q, k, v, plan), reference_attention(q, k, v, plan)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_head_dim_may_differ(kit, gen, backend):
    N = 90
    plan = kit.make_plan("segments", B, H, N, gen)
    q, k, _ = kit.make_qkv(B, H, N, D, torch.float32, gen)
    v = torch.randn(B, H, N, 16, generator=gen)
    out = run(kit, backend, q, k, v, plan)
    assert out.shape == (B, H, N, 16)
    assert kit.rel_l2(out, reference_attention(q, k, v, plan)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_options_together_in_bf16(kit, gen, backend):
    """Permutations, unequal segments, skip, reverse and stats in one bf16 call."""
    N = 120
    plan = kit.make_plan("segments", B, H, N, gen, density=0.7)
    skip = torch.rand(plan.kv_index.shape, generator=gen) < 0.3
    q, k, v = kit.make_qkv(B, H, N, D, torch.bfloat16, gen)
    out, stats = run(kit, backend, q, k, v, plan, skip=skip, tile_stats=True, reverse=True)
    ref = reference_attention(q.float(), k.float(), v.float(), plan.drop(skip))
    assert kit.rel_l2(out, ref) < kit.TOL[torch.bfloat16]
    ref_stats = reference_tile_stats(q, k, plan, skip=skip, reverse=True)
    assert torch.equal(stats.isinf(), ref_stats.isinf())
    finite = ref_stats.isfinite()
    torch.testing.assert_close(stats[finite], ref_stats[finite], atol=1e-3, rtol=0)


def test_one_sync_numbers_match_the_work_list(kit, gen):
    """The tile totals and density read in one device-to-host copy are those the work list and plan give."""
    bsa = importlib.import_module("vdit_sparse.kernels.block_sparse_attention")
    plan = kit.make_plan("segments", B, H, 200, gen)
    totals, density = bsa._host_numbers(plan, [16, 64, 128], with_density=True)
    for bm, total in totals.items():
        assert total == query_tiles(plan.q_offsets, bm)[0].numel()
        assert all(torch.equal(a, b) for a, b in zip(query_tiles(plan.q_offsets, bm, total), query_tiles(plan.q_offsets, bm)))
    assert density == pytest.approx(float(plan.density().mean()))


# ---------------------------------------------------------------- the plans the methods build


def method_settings(method, **overrides):
    """The settings object ``method.plan`` takes, built as tests/methods build it: the one place to follow its API."""
    return method.Settings().updated(**overrides)


def planted_heads(layout, kinds, dim, gen, logit=10.0):
    """q, k (1, H, N, dim): head h's video tokens match within their frame (kinds[h] "spatial") or at
    their spatial position across frames ("temporal"); text tokens carry noise only."""
    V, s = layout.video_tokens, layout.video_start
    token = torch.arange(V)
    group = torch.stack([token // layout.frame_tokens if kind == "spatial" else token % layout.frame_tokens for kind in kinds])
    codes = torch.linalg.qr(torch.randn(dim, dim, generator=gen)).Q * (logit * dim**0.5) ** 0.5  # orthogonal: groups never match
    q, k = (torch.randn(1, len(kinds), layout.num_tokens, dim, generator=gen) for _ in range(2))
    for x in (q, k):
        x[0, :, s : s + V] += codes[group % dim]  # (H, V, dim)
    return q, k


def planted_clusters(layout, heads, clusters, dim, gen, logit=10.0):
    """q, k (1, H, N, dim): each video token's q and k lie near one of ``clusters`` centres of its head."""
    V, s = layout.video_tokens, layout.video_start
    centres = torch.nn.functional.normalize(torch.randn(heads, clusters, dim, generator=gen), dim=-1) * (logit * dim**0.5) ** 0.5
    labels = torch.randint(0, clusters, (heads, V), generator=gen)
    q, k = (0.5 * torch.randn(1, heads, layout.num_tokens, dim, generator=gen) for _ in range(2))
    for x in (q, k):
        x[0, :, s : s + V] += centres[torch.arange(heads)[:, None], labels]  # (H, V, dim)
    return q, k


def _triton_matches_reference(kit, gen, q, k, plan):
    """The kernel on ``plan`` with a random skip mask: output and tile statistics against the reference, fp32."""
    plan.validate(q.shape[2])
    v = torch.randn(q.shape, generator=gen)
    skip = torch.rand(plan.kv_index.shape, generator=gen) < 0.2
    out, stats = run(kit, "triton", q, k, v, plan, skip=skip, tile_stats=True)
    assert kit.rel_l2(out, reference_attention(q, k, v, plan.drop(skip))) < 1e-5
    ref_stats = reference_tile_stats(q, k, plan, skip=skip)
    assert torch.equal(stats.isinf(), ref_stats.isinf())
    torch.testing.assert_close(stats[ref_stats.isfinite()], ref_stats[ref_stats.isfinite()], atol=1e-4, rtol=0)


@pytest.mark.parametrize("dim", [32, 64])
def test_triton_on_a_real_svg_plan(kit, gen, dim):
    """Band blocks, temporal heads permuted to spatial-major order, the first-frame sink, dense text after the video."""
    layout = VideoLayout(frames=4, height=4, width=8, text_tokens=24, text_position="after")  # N = 152
    kinds = ["spatial", "temporal", "temporal", "spatial"]
    q, k = planted_heads(layout, kinds, dim, gen)
    plan, info = SVG().plan(q, k, AttentionContext(layout=layout), method_settings(SVG, density=0.4, block_size=16))
    assert set(info["head_pattern"][0]) == {"spatial", "temporal"}  # permuted and unpermuted heads in one plan
    assert plan.q_perm is not None and float(plan.density().max()) < 0.8
    _triton_matches_reference(kit, gen, q, k, plan)


@pytest.mark.parametrize("dim", [32, 64])
def test_triton_on_a_real_svg2_plan(kit, gen, dim):
    """Clusters as unequal segments (some may be empty), tokens sorted by cluster, dense text before the video."""
    layout = VideoLayout(frames=2, height=8, width=8, text_tokens=20, text_position="before")  # N = 148
    q, k = planted_clusters(layout, 2, 6, dim, gen)
    settings = method_settings(SVG2, num_q_clusters=8, num_k_clusters=12, kmeans_iters_first=10)
    plan, _ = SVG2().plan(q, k, AttentionContext(layout=layout), settings)
    sizes = plan.q_offsets.diff(dim=1)
    assert sizes.shape == (2, 9) and sizes[:, 1:].unique().numel() > 2  # one text block, then 8 unequal clusters
    assert float(plan.density().max()) < 0.8
    _triton_matches_reference(kit, gen, q, k, plan)
