"""The CPU path's inner loop in C++: flash attention over each query tile's kept key segments only.

Built on the first CPU call that needs it by one ``c++ -O3 -march=native`` call (a few seconds: plain
C++ that includes no torch header and links ``sgemm_`` from libtorch_cpu) into the cache directory,
keyed by source, flags, torch version and CPU: once per machine, never per shape or mask. Loaded with
ctypes. ``compile_seconds()`` reports the build time apart from run time. Without a C++ compiler, or
when the build fails, one line on stderr says so (once per process) and ``cpu_gathered.py``'s
pure-PyTorch chunks run instead. ``VDIT_SPARSE_CPU_EXTENSION=0`` turns the extension off.
(``torch.utils.cpp_extension.load_inline`` took 258 s here for the same loop: torch's headers.)

Why C++: the pure-PyTorch chunks make five passes over each score matrix (matmul, max, subtract and
exp, sum, matmul) and torch's accurate exp costs as much as the two matmuls at D = 32; torch's own
dense CPU attention fuses those passes and uses a cheaper exp. Matching it needs the same structure:
per tile, up to ``PIECE`` kept keys copied next to each other (kept blocks are rarely adjacent; keys
that are already one run of rows, as whole key lists at density 1, are read in place), one BLAS sgemm
for QKᵀ, one fused pass for max, exp (a degree-6 polynomial after range reduction, relative error
~1e-7, vectorised at the machine's full width: 16 lanes with AVX-512) and row sums with the
online-softmax rescale, one sgemm for PV. The tile statistics come out of the max pass: per slot, its
max minus the running max at the slot's end. q is read and out written in model order through the
query permutation, scale folded in, so no (N, D) tensor is copied or allocated per call when the
inputs are float32 and contiguous: fresh allocations of that size cost page faults on every call.

Work: ``torch.get_num_threads()`` threads (the caller's and std::threads) take tiles, longest first,
one at a time from a shared counter; each tile's rows of ``out`` and row of the per-tile statistics
are written by the one thread that took it. BLAS runs one thread per caller (MKL's thread-local
setting), or the sgemm calls' own threads fight the loop's (2 threads were 7x slower than 1).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PIECE = 512  # keys per QKᵀ piece: a 64 x 512 score block (128 KiB) stays in L2, as in torch's flash kernel

_SOURCE = r"""
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const float*, const int*, const float*, const int*, const float*, float*, const int*);
// MKL (inside libtorch_cpu on x86): one BLAS thread per calling thread. Weak: absent from a torch without MKL.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

static const float NEG = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial in Horner form
// (relative error < 2e-7), 2^n through the exponent bits. Plain arithmetic, so the loops calling it
// vectorise at the machine's full width (16 lanes with AVX-512: GCC 12 turns nearbyint into one rounding
// instruction, where floor(x + 0.5) kept the loop scalar).
static inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.4426950408889634f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// Row-major C (m x n) = A (m x k) . B^T (B: n x k), or A . B (B: k x n), through column-major sgemm.
static void matmul(bool b_transposed, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                   float beta, float* c, int ldc) {
  const float one = 1.0f;
  const char ta = 'N', tb = b_transposed ? 'T' : 'N';
  sgemm_(&tb, &ta, &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

static float range_max(const float* x, int n) {
  float mx = NEG;
#pragma omp simd reduction(max : mx)
  for (int c = 0; c < n; ++c) mx = x[c] > mx ? x[c] : mx;
  return mx;
}

// x[c] = exp(x[c] - ref) in place; returns their sum (summed in lanes: the reduction clause allows it)
static float exp_sum(float* x, int n, float ref) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int c = 0; c < n; ++c) {
    const float e = exp_nonpositive(x[c] - ref);
    x[c] = e;
    sum += e;
  }
  return sum;
}

struct Args {
  const float *q, *k, *v;
  const int64_t *rows, *q_lo, *q_hi, *slot_lo, *slot_size;
  float *out, *stats;
  int64_t T;
  int D, Dv, L, piece;
  float scale;
};

// Tiles taken one at a time from ``next`` until none is left: online softmax over each tile's slots,
// PIECE keys at a time. Taking tiles as they come keeps threads busy when one of them is descheduled.
static void run_tiles(const Args& A, std::atomic<int64_t>* next) {
  // each sgemm here is one 64-row tile's: BLAS threads of its own would only fight this loop's threads
  // (measured: 2 threads ran 7x slower than 1 before this line)
  const int blas_threads = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
  const int D = A.D, Dv = A.Dv, L = A.L, piece = A.piece;
  std::vector<float> qbuf, kbuf((size_t)piece * D), vbuf((size_t)piece * Dv), s, m, l, acc, smax, tstat(L);
  std::vector<int> bounds, owner;  // per slot part in the piece: end column, and its slot when it ends there (else -1)
  std::vector<int64_t> starts;     // and its first row
  for (int64_t t = next->fetch_add(1); t < A.T; t = next->fetch_add(1)) {
    const int M = (int)(A.q_hi[t] - A.q_lo[t]);
    if (M <= 0) continue;
    qbuf.resize((size_t)M * D);
    for (int i = 0; i < M; ++i) {  // the tile's query rows, scaled, read through the permutation if any
      const int64_t r = A.q_lo[t] + i;
      const float* src = A.q + (A.rows ? A.rows[r] : r) * D;
      for (int d = 0; d < D; ++d) qbuf[(size_t)i * D + d] = src[d] * A.scale;
    }
    const int64_t* slo = A.slot_lo + t * L;
    const int64_t* ssz = A.slot_size + t * L;
    m.assign(M, NEG); l.assign(M, 0.0f); acc.assign((size_t)M * Dv, 0.0f); smax.assign(M, NEG);
    std::fill(tstat.begin(), tstat.end(), NEG);
    int slot = 0;
    int64_t used = 0;  // keys of the current slot already taken
    while (slot < L && ssz[slot] > 0) {
      bounds.clear(); owner.clear(); starts.clear();
      int P = 0;
      bool in_place = true;  // the piece's keys are one run of rows (whole key lists at density 1, adjacent blocks)
      while (P < piece && slot < L && ssz[slot] > 0) {  // the next kept keys, up to a piece
        const int take = (int)std::min<int64_t>(piece - P, ssz[slot] - used);
        const int64_t first = slo[slot] + used;
        in_place &= starts.empty() || first == starts[0] + P;
        starts.push_back(first);
        P += take; used += take;
        const bool ends = used == ssz[slot];
        bounds.push_back(P); owner.push_back(ends ? slot : -1);
        if (ends) { ++slot; used = 0; }
      }
      // one run is read in place; other pieces are copied next to each other (kept blocks are rarely adjacent)
      const float *kp = A.k + starts[0] * D, *vp = A.v + starts[0] * Dv;
      if (!in_place) {
        for (size_t part = 0, c0 = 0; part < starts.size(); c0 = bounds[part], ++part) {
          const size_t take = bounds[part] - c0;
          std::memcpy(&kbuf[c0 * D], A.k + starts[part] * D, sizeof(float) * take * D);
          std::memcpy(&vbuf[c0 * Dv], A.v + starts[part] * Dv, sizeof(float) * take * Dv);
        }
        kp = kbuf.data(); vp = vbuf.data();
      }
      s.resize((size_t)M * P);
      matmul(true, M, P, D, qbuf.data(), D, kp, D, 0.0f, s.data(), P);
      for (int i = 0; i < M; ++i) {
        float* row = &s[(size_t)i * P];
        float run = m[i];
        int c0 = 0;
        for (size_t part = 0; part < bounds.size(); ++part) {  // slot maxima and the running max, in scan order
          const float mx = range_max(row + c0, bounds[part] - c0);
          smax[i] = std::max(smax[i], mx);
          run = std::max(run, mx);
          if (owner[part] >= 0) {  // the slot ends here: its statistic, then a fresh slot max
            tstat[owner[part]] = std::max(tstat[owner[part]], smax[i] - run);
            smax[i] = NEG;
          }
          c0 = bounds[part];
        }
        const float alpha = m[i] == NEG ? 0.0f : exp_nonpositive(m[i] - run);
        l[i] = l[i] * alpha + exp_sum(row, P, run);
        m[i] = run;
        float* a = &acc[(size_t)i * Dv];
        for (int d = 0; d < Dv; ++d) a[d] *= alpha;
      }
      matmul(false, M, Dv, P, s.data(), P, vp, Dv, 1.0f, acc.data(), Dv);
    }
    for (int i = 0; i < M; ++i) {
      const int64_t r = A.q_lo[t] + i;
      float* o = A.out + (A.rows ? A.rows[r] : r) * Dv;
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;  // no key at all: zeros
      for (int d = 0; d < Dv; ++d) o[d] = acc[(size_t)i * Dv + d] * inv;
    }
    if (A.stats) std::memcpy(A.stats + t * L, tstat.data(), sizeof(float) * L);
  }
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(blas_threads);  // 0 restores the global setting
}

// k (R, D), v (R, Dv): float32 rows in plan order; q (R, D) and out (R, Dv): float32 rows in model order,
// plan row r being model row rows[r] (rows null: the same order). Tile t covers plan rows q_lo[t] ..
// q_hi[t]; its key list is slots 0 .. L-1 of (slot_lo, slot_size), used slots first. Writes every covered
// row of out (zeros for a tile with no key) and, if stats is not null, stats (T, L). Each tile is taken by
// exactly one thread, which alone writes its rows.
extern "C" void block_sparse_forward(const float* q, const float* k, const float* v, const int64_t* rows,
                                     const int64_t* q_lo, const int64_t* q_hi, const int64_t* slot_lo,
                                     const int64_t* slot_size, float* out, float* stats, int64_t T, int D, int Dv,
                                     int L, int piece, int threads, float scale) {
  Args A{q, k, v, rows, q_lo, q_hi, slot_lo, slot_size, out, stats, T, D, Dv, L, piece, scale};
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int w = 1; w < std::min<int64_t>(threads, T); ++w) pool.emplace_back(run_tiles, std::cref(A), &next);
  run_tiles(A, &next);  // the calling thread works too
  for (auto& th : pool) th.join();
}
"""

_STATE: dict = {}
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17"]


def extension():
    """The loaded library, or None (compiler missing, build failed, or turned off); built at most once per process."""
    if "lib" in _STATE:
        return _STATE["lib"]
    _STATE["lib"] = None
    if os.environ.get("VDIT_SPARSE_CPU_EXTENSION", "1") == "0":
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        _notice(f"no C++ compiler ({compiler!r} not on PATH)")
        return None
    t0 = time.perf_counter()
    try:
        _STATE["lib"] = _load(_build(compiler))
    except (OSError, subprocess.CalledProcessError) as e:  # the pure-PyTorch path gives the same answers
        detail = getattr(e, "stderr", "") or str(e)
        _notice(f"its build failed ({detail.strip().splitlines()[-1][:160] if detail.strip() else type(e).__name__})")
    _STATE["compile_seconds"] = time.perf_counter() - t0
    return _STATE["lib"]


def compile_seconds() -> float | None:
    """Seconds this process spent building (or finding the cached build of) the library; None before."""
    return _STATE.get("compile_seconds")


def _build(compiler: str) -> Path:
    """The shared library for this source, flags, torch and CPU, built once into the cache directory."""
    torch_lib = Path(torch.__file__).parent / "lib"
    key = hashlib.sha256("\0".join([_SOURCE, *FLAGS, torch.__version__, _cpu_model(), compiler]).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_block_sparse_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "block_sparse.cpp", Path(tmp) / "block_sparse.so"
        src.write_text(_SOURCE)
        cmd = [compiler, *FLAGS, str(src), "-o", str(lib), f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}", "-pthread"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(lib, target)  # atomic: a concurrent build or a reader never sees half a file
    return target


def cache_dir() -> Path:
    """$VDIT_SPARSE_CACHE_DIR, else $XDG_CACHE_HOME/vdit_sparse, else ~/.cache/vdit_sparse (as the tuning cache)."""
    if os.environ.get("VDIT_SPARSE_CACHE_DIR"):
        return Path(os.environ["VDIT_SPARSE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vdit_sparse"


def _cpu_model() -> str:
    # -march=native: a build is only valid on the CPU it was made for
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    fn = lib.block_sparse_forward
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] + [ctypes.c_int] * 5 + [ctypes.c_float]
    return fn


def _notice(reason: str) -> None:
    print(f"vdit_sparse: CPU block-sparse extension not used: {reason}; running the slower pure-PyTorch path", file=sys.stderr)


def run_tiles(q, kp, vp, rows, tiles, result, stats, scale: float, fn) -> None:
    """All tiles of ``tiles`` (cpu_gathered.tile_list) through the compiled loop. q (G·N, D) and result
    (G·N, Dv): float32 model order; kp, vp: plan order; ``rows`` (G·N,) plan row -> model row, or None;
    ``stats``: None or the flat (G·Sq·L,) statistics, reduced into."""
    T, L = tiles["lo"].shape
    threads = torch.get_num_threads()
    order = torch.arange(T - 1, -1, -1)  # tiles come sorted by key count: the longest first, so the last ones taken are short
    per_tile = [tiles[name][order].contiguous() for name in ("q_first", "q_end", "lo", "size")]
    tile_stats = torch.empty(T, L, dtype=torch.float32) if stats is not None else None
    ptrs = [q.data_ptr(), kp.data_ptr(), vp.data_ptr(), rows.data_ptr() if rows is not None else None]
    ptrs += [t.data_ptr() for t in per_tile] + [result.data_ptr(), tile_stats.data_ptr() if tile_stats is not None else None]
    fn(*ptrs, T, q.shape[1], vp.shape[1], L, PIECE, threads, scale)
    if stats is not None:  # tiles of one query segment share its entries: reduce them here, race-free
        stats.scatter_reduce_(0, tiles["flat"][order].reshape(-1), tile_stats.view(-1), reduce="amax")
