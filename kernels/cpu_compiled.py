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

// The plan's tensors (int32, contiguous): q_offsets (G, Sq + 1), k_offsets (G, Sk + 1), kv_count (G, Sq),
// kv_index (G, Sq, L); skip (G, Sq, L) bytes or null.
struct Plan {
  const int32_t *q_offsets, *k_offsets, *kv_count, *kv_index;
  const uint8_t* skip;
  int64_t G, N, Sq, Sk, L;
  bool reverse;
};

// The work list. Per (g, query segment) row: its computed key segments in scan order as slots (first row in the
// (G·N, ·) rows, size, kv_index entry), used slots first, unused ones of size 0. Per tile (up to block_m rows of
// one segment), longest key list first: its first and end row and its segment row.
struct Work {
  std::vector<int64_t> slot_lo, slot_size, entry, q_lo, q_hi, tile_seg;
};

static Work make_work(const Plan& P, int block_m) {
  const int64_t rows = P.G * P.Sq, L = P.L;
  Work W;
  W.slot_lo.assign(rows * L, 0); W.slot_size.assign(rows * L, 0); W.entry.assign(rows * L, 0);
  std::vector<int64_t> total(rows, 0);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t g = row / P.Sq, count = P.kv_count[row];
    const int32_t* koff = P.k_offsets + g * (P.Sk + 1);
    int64_t used = row * L;
    for (int64_t j = 0; j < L; ++j) {
      const int64_t l = P.reverse ? L - 1 - j : j;
      if (l >= count || (P.skip && P.skip[row * L + l])) continue;  // past the list, or skipped: not computed
      const int32_t seg = P.kv_index[row * L + l];
      if (seg < 0 || seg >= P.Sk || koff[seg + 1] <= koff[seg]) continue;
      W.slot_lo[used] = g * P.N + koff[seg]; W.slot_size[used] = koff[seg + 1] - koff[seg]; W.entry[used] = l;
      total[row] += W.slot_size[used++];
    }
    const int64_t lo = P.q_offsets[g * (P.Sq + 1) + row % P.Sq], hi = P.q_offsets[g * (P.Sq + 1) + row % P.Sq + 1];
    for (int64_t r = lo; r < hi; r += block_m) {
      W.q_lo.push_back(g * P.N + r); W.q_hi.push_back(g * P.N + std::min<int64_t>(r + block_m, hi)); W.tile_seg.push_back(row);
    }
  }
  // longest first, so the last tiles taken are short and threads finish together
  std::vector<int64_t> order(W.q_lo.size());
  for (size_t t = 0; t < order.size(); ++t) order[t] = (int64_t)t;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return total[W.tile_seg[a]] > total[W.tile_seg[b]]; });
  Work sorted{std::move(W.slot_lo), std::move(W.slot_size), std::move(W.entry), {}, {}, {}};
  for (int64_t t : order) {
    sorted.q_lo.push_back(W.q_lo[t]); sorted.q_hi.push_back(W.q_hi[t]); sorted.tile_seg.push_back(W.tile_seg[t]);
  }
  return sorted;
}

struct Args {
  const float *q, *k, *v;
  const int64_t *rows, *q_lo, *q_hi, *tile_seg, *slot_lo, *slot_size;
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
    const int64_t* slo = A.slot_lo + A.tile_seg[t] * L;
    const int64_t* ssz = A.slot_size + A.tile_seg[t] * L;
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

// k (G·N, D), v (G·N, Dv): float32 rows in plan order; q (G·N, D) and out (G·N, Dv): float32 rows in model
// order, plan row r being model row rows[r] (rows null: the same order). Writes every row of out (zeros for a
// query with no key) and, if stats is not null, stats (G, Sq, L): per computed entry, the max over its
// segment's rows of (the entry's max scaled logit - the running max after it), left alone elsewhere. Each
// tile is taken by exactly one thread, which alone writes its rows; the statistics are reduced afterwards.
extern "C" void block_sparse_forward(const float* q, const float* k, const float* v, const int64_t* rows,
                                     const int32_t* q_offsets, const int32_t* k_offsets, const int32_t* kv_count,
                                     const int32_t* kv_index, const uint8_t* skip, int reverse, float* out,
                                     float* stats, int64_t G, int64_t N, int64_t Sq, int64_t Sk, int L, int D, int Dv,
                                     int block_m, int piece, int threads, float scale) {
  const Plan P{q_offsets, k_offsets, kv_count, kv_index, skip, G, N, Sq, Sk, L, reverse != 0};
  const Work W = make_work(P, block_m);
  const int64_t T = (int64_t)W.q_lo.size();
  std::vector<float> tile_stats(stats ? T * L : 0);
  Args A{q, k, v, rows, W.q_lo.data(), W.q_hi.data(), W.tile_seg.data(), W.slot_lo.data(), W.slot_size.data(),
         out, stats ? tile_stats.data() : nullptr, T, D, Dv, L, piece, scale};
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int w = 1; w < std::min<int64_t>(threads, T); ++w) pool.emplace_back(run_tiles, std::cref(A), &next);
  run_tiles(A, &next);  // the calling thread works too
  for (auto& th : pool) th.join();
  if (!stats) return;
  for (int64_t t = 0; t < T; ++t) {  // tiles of one segment share its entries: reduced here, one thread
    const int64_t row = W.tile_seg[t];
    for (int j = 0; j < L && W.slot_size[row * L + j] > 0; ++j) {
      float& dst = stats[row * L + W.entry[row * L + j]];
      dst = std::max(dst, tile_stats[t * L + j]);
    }
  }
}
"""

_STATE: dict = {}
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC", "-std=c++17"]
if platform.machine().lower() in ("x86_64", "amd64"):  # GCC prefers 256-bit vectors even where AVX-512 exists
    FLAGS.insert(2, "-mprefer-vector-width=512")


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
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_int] * 6 + [ctypes.c_float]
    return fn


def _notice(reason: str) -> None:
    print(f"vdit_sparse: CPU block-sparse extension not used: {reason}; running the slower pure-PyTorch path", file=sys.stderr)


def run_plan(q, kp, vp, rows, plan, skip, reverse: bool, block_m: int, result, stats, scale: float, fn) -> None:
    """``plan`` through the compiled loop, which builds its own work list. q (G·N, D) and result (G·N, Dv):
    float32 model order; kp, vp: plan order; ``rows`` (G·N,) plan row -> model row, or None; ``stats``: None
    or the (G·Sq·L,) statistics, -inf filled, reduced into."""
    G, Sq, L = plan.kv_index.shape
    index = [t.contiguous() for t in (plan.q_offsets, plan.k_offsets, plan.kv_count, plan.kv_index)]  # plans may be expanded over heads
    skip = skip.contiguous().view(torch.uint8) if skip is not None else None
    ptrs = [q.data_ptr(), kp.data_ptr(), vp.data_ptr(), rows.data_ptr() if rows is not None else None]
    ptrs += [t.data_ptr() for t in index] + [skip.data_ptr() if skip is not None else None]
    fn(*ptrs, int(reverse), result.data_ptr(), stats.data_ptr() if stats is not None else None, G, plan.num_tokens,
       Sq, plan.k_offsets.shape[1] - 1, L, q.shape[1], vp.shape[1], block_m, PIECE, torch.get_num_threads(), scale)
