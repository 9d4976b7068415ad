"""The launch-config cache: where it lives, what it keys on, and that tuning happens once per key."""

import importlib
import json

import pytest
import torch

from vdit_sparse.kernels import autotune_cache as ac
from vdit_sparse.kernels.reference import reference_attention

# the package exports the function under the module's name: fetch the module itself
bsa = importlib.import_module("vdit_sparse.kernels.block_sparse_attention")

CANDIDATES = ({"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
              {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},
              {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("VDIT_SPARSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ac.cache_dir() == tmp_path / "xdg" / "vdit_sparse"
    monkeypatch.setenv("VDIT_SPARSE_CACHE_DIR", str(tmp_path / "mine"))
    assert ac.cache_dir() == tmp_path / "mine"


def test_density_bands():
    assert [ac.density_band(d) for d in (0.0, 0.08, 0.1, 0.15, 0.3, 0.5, 1.0)] == [
        "<=0.1", "<=0.1", "<=0.1", "<=0.2", "<=0.4", "<=0.7", "<=1.0"]
    with pytest.raises(ValueError, match="density"):
        ac.density_band(1.5)


def test_candidates_are_few_and_valid():
    assert 2 <= len(ac.CANDIDATES) <= 6
    for cfg in ac.CANDIDATES:
        assert set(cfg) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
        assert cfg["BLOCK_M"] in (64, 128) and cfg["BLOCK_N"] in (32, 64, 128)


def test_tunes_once_then_reads_the_file(tmp_path):
    path = tmp_path / "c.json"
    timed = []

    def measure(cfg):
        timed.append(cfg)
        return {64: 3.0, 32: 1.0, 16: 2.0}[cfg["BLOCK_M"]]

    chosen = ac.ConfigCache(path).pick("k1", CANDIDATES, measure)
    assert chosen["BLOCK_M"] == 32 and len(timed) == 3
    assert json.loads(path.read_text())["k1"]["BLOCK_M"] == 32

    def must_not_run(cfg):
        raise AssertionError("re-tuned a cached key")

    again = ac.ConfigCache(path).pick("k1", CANDIDATES, must_not_run)  # a new process: reads the file
    assert again == chosen


def test_failing_and_non_finite_configs_are_skipped(tmp_path):
    def measure(cfg):
        if cfg["BLOCK_M"] == 64:
            raise RuntimeError("out of shared memory")
        return float("inf") if cfg["BLOCK_M"] == 32 else 5.0  # inf: output was not finite

    assert ac.ConfigCache(tmp_path / "c.json").pick("k", CANDIDATES, measure)["BLOCK_M"] == 16
    with pytest.raises(RuntimeError, match="no launch config"):
        ac.ConfigCache(tmp_path / "d.json").pick("k", CANDIDATES, lambda cfg: float("inf"))


def test_tuning_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("VDIT_SPARSE_AUTOTUNE", "0")
    cache = ac.ConfigCache(tmp_path / "c.json")
    assert cache.pick("k", CANDIDATES, lambda cfg: 1 / 0) == CANDIDATES[0]
    assert not (tmp_path / "c.json").exists()


def test_kernel_tuning_picks_and_persists(kit, gen, tmp_path, monkeypatch):
    """The kernel's own tuning path, with the timer faked (no GPU here): runs every candidate, caches the fastest."""
    kit.need_triton()
    monkeypatch.setenv("VDIT_SPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ac, "CANDIDATES", CANDIDATES)
    fake_ms = iter([3.0, 1.0, 2.0])

    def fake_bench(fn, **kw):
        fn()
        return next(fake_ms)

    monkeypatch.setattr(bsa.triton.testing, "do_bench", fake_bench)
    N = 64
    plan = kit.make_plan("blocks", 1, 1, N, gen, density=0.3).to(kit.DEVICE)
    q, k, v = (t.to(kit.DEVICE) for t in kit.make_qkv(1, 1, N, 16, torch.float32, gen))

    def run(cfg, out, stats):
        return bsa._launch(q, k, v, plan, 0.25, None, False, out, stats, cfg)

    chosen = bsa._tuned_config(q, v, plan, run)
    assert chosen["BLOCK_M"] == 32
    (key, saved), = json.loads((tmp_path / ac.CACHE_FILE).read_text()).items()
    assert saved["BLOCK_M"] == 32 and "N=64" in key and "D=16" in key and "density <=" in key
    out = torch.empty_like(q)
    run(chosen, out, None)
    assert kit.rel_l2(out, reference_attention(q.cpu(), k.cpu(), v.cpu(), plan.to("cpu"), 0.25)) < 1e-5
