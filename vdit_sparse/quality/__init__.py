"""How close an accelerated video stays to the dense one, and how good each looks.

    from vdit_sparse.quality import psnr, ssim, compare_videos
    psnr(dense, fast)            # dB, per frame then averaged; inf when identical
    ssim(dense, fast)            # Gaussian window, per frame then averaged
    compare_videos(dense, fast)  # all metrics, LPIPS when available offline, VBench-style proxies

Videos are ``(T, H, W, C)``: uint8 frames, or floats in [0, 1] (numpy or torch).
"""

from .perceptual import LpipsResult, lpips
from .metrics import psnr, psnr_per_frame, ssim, ssim_per_frame
from .suite import compare_videos
from .vbench import vbench_proxies

__all__ = ["psnr", "ssim", "psnr_per_frame", "ssim_per_frame", "lpips", "LpipsResult", "compare_videos", "vbench_proxies"]
