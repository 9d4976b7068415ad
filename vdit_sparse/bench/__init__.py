"""``vdit-sparse bench``: the GPU benchmarks, one mode per run; every figure a ratio from the same run.

    vdit-sparse bench --kernels [...]      block-sparse kernel against cuDNN SDPA and FlexAttention (kernels.py)
    vdit-sparse bench --e2e [...]          one transformer forward, dense and each method, eager and compiled (e2e.py)
    vdit-sparse bench --cost-model [...]   ms per computed block at each density, for ``tune`` (cost_model.py)

``vdit-sparse bench --kernels --help`` lists a mode's options. ``scripts/bench_*.py`` run the same
code from a checkout. Results are recorded in BENCHMARKS.md with the command, device, date and versions.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import UserError

HELP = "GPU benchmarks: --kernels, --e2e, --cost-model (ratios against dense from the same run)"
MODES = {"--kernels": "kernels", "--e2e": "e2e", "--cost-model": "cost_model"}


def require_cuda(mode: str) -> None:
    """A one-line error, before any work, when no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"bench {mode}: needs a CUDA GPU and torch.cuda.is_available() is False here (torch {torch.__version__}); "
            "on a CPU, --e2e --smoke and --cost-model --device cpu check the benchmarks without timing a GPU"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    modes = [a for a in argv if a in MODES]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if len(modes) != 1:
        raise UserError(f"bench: give exactly one of {', '.join(MODES)} (got {', '.join(modes) or 'none'})")
    argv.remove(modes[0])
    module = importlib.import_module(f".{MODES[modes[0]]}", __name__)
    return module.main(argv)
