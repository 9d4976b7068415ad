"""SSIM of one 25-frame 128 x 128 clip pair: torchmetrics' 2-D float64 convolution against
vdit_sparse's separable window, timed one after the other in one process, twice (BENCHMARKS.md).

    python scripts/bench_ssim.py            # torch's default threads
    OMP_NUM_THREADS=1 python scripts/bench_ssim.py
"""

import time

import numpy as np
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from vdit_sparse.quality.metrics import ssim_per_frame


def main() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((25, 128, 128, 3))
    b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2) for x in (a, b))
    for _ in range(2):
        t = time.perf_counter()
        ref = structural_similarity_index_measure(tb, ta, sigma=1.5, data_range=1.0, reduction="none").numpy()
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        ours = ssim_per_frame(a, b)
        t_ours = time.perf_counter() - t
        print(f"threads {torch.get_num_threads()}: torchmetrics {t_ref:.2f} s, vdit_sparse {t_ours:.3f} s, "
              f"ratio {t_ref / t_ours:.1f}x, largest difference {np.abs(ref - ours).max():.1e}")


if __name__ == "__main__":
    main()
