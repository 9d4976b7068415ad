"""Kernel tests run Triton through its CPU interpreter when no GPU is present.

Triton decides interpreted-or-compiled when a function is decorated, and reads TRITON_INTERPRET
again at a few points while running. So the variable is set while the kernel module is imported
(re-imported if something imported it before without it) and, by an autouse fixture, during each
test of this directory only; it is restored afterwards, so other test directories never see it.
"""

import importlib
import os

import pytest
import torch

MODULE = "vdit_sparse.kernels.block_sparse_attention"
INTERPRET = not torch.cuda.is_available()


def _import_interpreted():
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        # the first import of triton must happen here: its own jit helpers are decorated at that moment
        import triton.experimental.gluon  # noqa: F401 - imported lazily at launch, asserts interpreter mode

        module = importlib.import_module(MODULE)
        if not module._interpreted():  # decorated earlier without the interpreter: decorate again
            importlib.reload(module)  # re-runs the module in its own namespace, so importers see the new kernel
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def _interpreter_ready() -> bool:
    """False when triton was first imported elsewhere without the interpreter: its own helpers
    (tl.zeros, tl.max, ...) are then compiled-only and interpreted kernels cannot call them."""
    from triton.runtime.interpreter import InterpretedFunction
    import triton.language.standard as standard

    return isinstance(standard.zeros, InterpretedFunction)


if INTERPRET:
    _import_interpreted()
TRITON_OK = not INTERPRET or _interpreter_ready()
TRITON_SKIP = "triton was imported before tests/kernels/conftest.py without TRITON_INTERPRET: run tests/kernels first"


def need_triton():
    if not TRITON_OK:
        pytest.skip(TRITON_SKIP)


@pytest.fixture(scope="session")
def _config_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vdit_sparse_cache")


@pytest.fixture(autouse=True)
def _kernel_test_env(monkeypatch, _config_cache_dir):
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("VDIT_SPARSE_CACHE_DIR", str(_config_cache_dir))  # tests never touch the user's cache
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes on a shared 2-core machine: intra-op threads only contend
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- plans and inputs shared by the tests

DEVICE = "cpu" if INTERPRET else "cuda"  # where the Triton backend runs
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def random_segments(G, N, count, gen):
    """(G, count + 1) int32 offsets with random cut points: unequal sizes, empty segments possible."""
    cuts = torch.randint(0, N + 1, (G, count - 1), generator=gen).sort(dim=1).values
    zeros, ends = torch.zeros(G, 1, dtype=torch.long), torch.full((G, 1), N)
    return torch.cat([zeros, cuts, ends], 1).to(torch.int32)


def random_lists(q_offsets, k_offsets, density, gen, empty_rows=1):
    """kv_count (G, Sq), kv_index (G, Sq, L): distinct random key segments, ``empty_rows`` rows with none."""
    G, Sq, Sk = q_offsets.shape[0], q_offsets.shape[1] - 1, k_offsets.shape[1] - 1
    order = torch.rand(G, Sq, Sk, generator=gen).argsort(dim=2)  # distinct ids per row
    count = (torch.rand(G, Sq, Sk, generator=gen) < density).sum(2)
    count[:, :empty_rows] = 0
    L = max(int(count.max()), 1)
    return count.to(torch.int32), order[..., :L].to(torch.int32).contiguous()


def random_perm(G, N, gen):
    return torch.rand(G, N, generator=gen).argsort(dim=1).to(torch.int32)


@pytest.fixture
def gen(seed):
    """A generator seeded with the test's printed seed."""
    return torch.Generator().manual_seed(seed)


def make_plan(kind, B, H, N, gen, density=0.5):
    """A BlockPlan of one of the kinds the kernel must handle."""
    from vdit_sparse.plan import BlockPlan, from_block_mask

    G = B * H
    if kind in ("blocks", "ragged_n"):
        bm, bn = (32, 32) if kind == "blocks" else (32, 48)
        mask = torch.rand(B, H, -(-N // bm), -(-N // bn), generator=gen) < density
        mask[:, :, 0] = False  # a query block with no key blocks
        return from_block_mask(mask, (bm, bn), N)
    q_off, k_off = random_segments(G, N, 7, gen), random_segments(G, N, 9, gen)
    if kind == "perm":  # uniform blocks of 40 tokens in a permuted order
        q_off = k_off = torch.arange(0, N + 40, 40).clamp_max(N).unique().to(torch.int32).expand(G, -1).contiguous()
    count, index = random_lists(q_off, k_off, density, gen)
    perms = kind in ("perm", "segments")
    return BlockPlan(
        q_offsets=q_off, k_offsets=k_off, kv_count=count, kv_index=index, batch=B, heads=H,
        q_perm=random_perm(G, N, gen) if perms else None, k_perm=random_perm(G, N, gen) if perms else None,
        num_tokens=N,
    )


def make_qkv(B, H, N, D, dtype, gen, device="cpu"):
    return [torch.randn(B, H, N, D, generator=gen).to(dtype).to(device) for _ in range(3)]


def poisoned(like):
    """An output buffer full of NaN: any row the kernel fails to write shows up."""
    return torch.full_like(like, float("nan"))


def rel_l2(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture
def kit():
    """The helpers above, as one object (fixtures travel better than imports between test files)."""
    import types

    return types.SimpleNamespace(
        make_plan=make_plan, make_qkv=make_qkv, poisoned=poisoned, rel_l2=rel_l2,
        random_segments=random_segments, random_lists=random_lists, random_perm=random_perm, DEVICE=DEVICE, TOL=TOL,
        need_triton=need_triton,
    )
