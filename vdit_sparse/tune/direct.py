"""``tune --measure-candidates``: each candidate's error measured on the video, not predicted from attention.

The default search ranks a layer's candidates by their relative attention error, and ``--layer-sensitivity``
scales each layer's curve by one probe at its middle candidate. Both assume that the video's error follows
the attention error with one factor per layer; on the embedded models it does not (a flat layer's large
attention error barely shows, and the curve's shape differs per layer). Here every lossy candidate of every
layer runs end to end once per calibration prompt, that layer at the candidate and every other layer dense,
and its error becomes the video's mean squared error against the dense video, 10^(−PSNR/10) (frames in
[0, 1]). Errors of different layers then add as independent small perturbations of the frames do, so the
search's "mean error ≤ E" is "summed video MSE ≤ L·E", and the PSNR fit of ``--target-psnr`` keeps its form
(PSNR ≈ a − 10·log10(mean MSE) when the sum holds; the fit measures a and the slope).

Cost: one run per (layer, lossy candidate, calibration prompt); on the 448-token embedded model with six
layers, eight density values and two prompts, 96 runs (a few minutes on one CPU core).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from .search import Option

# (table {layer: setting}, progress label) -> mean PSNR in dB of runs with that table against the dense videos
RunTable = Callable[[dict, str], float]


def video_mse(psnr: float) -> float:
    """Mean squared error of frames in [0, 1] at ``psnr`` dB."""
    return 10 ** (-psnr / 10)


def probe_table(options: dict[int, list[Option]], layer: int, option: Option) -> dict:
    """Every layer dense but ``layer``, which runs ``option``'s setting."""
    table = {other: {"attention": "dense"} for other in options}
    table[layer] = dict(option.setting)
    return table


def measured_options(options: dict[int, list[Option]], run_table: RunTable) -> dict[int, list[Option]]:
    """``options`` with each lossy candidate's error replaced by the video MSE it causes alone.

    A candidate of zero predicted error (dense) stays at zero and is not run.
    """
    out = {}
    for layer, opts in options.items():
        out[layer] = [
            o if o.error == 0 else replace(o, error=video_mse(run_table(probe_table(options, layer, o),
                                                                        f"layer {layer} alone at {o.setting}")))
            for o in opts
        ]
    return out
