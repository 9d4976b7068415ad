"""Cost of the handle's per-call checks (vdit_sparse/ownership.py) on the embedded model, one torch thread.

Times the two checks the step hook makes at every transformer call (our processors still installed; the
accelerated pipeline is the caller) inside real pipeline runs, against the transformer call they guard;
then whole pipeline calls with the checks and without them (no-ops), alternated.

    python scripts/bench_handle_checks.py [--repeats 5]
"""

import argparse
import statistics
import time

import torch

import vdit_sparse as vs
from vdit_sparse import integration

RUN = dict(prompt="a red square moving right", num_frames=25, height=128, width=128, num_inference_steps=4,
           max_sequence_length=16, output_type="latent")


def timed(fn, log):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            log.append(time.perf_counter() - start)

    return wrapper


def check_and_call_times(pipe) -> tuple[list, list]:
    """Seconds of the checks (both, per transformer call) and of the transformer calls, over one run."""
    checks, calls = [], []
    a, b = integration.check_processors, integration.check_caller
    integration.check_processors, integration.check_caller = timed(a, checks), timed(b, checks)
    starts = []
    pre = pipe.transformer.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
    post = pipe.transformer.register_forward_hook(lambda *_: calls.append(time.perf_counter() - starts.pop()))
    try:
        pipe(**RUN, generator=torch.Generator().manual_seed(0))
    finally:
        integration.check_processors, integration.check_caller = a, b
        pre.remove()
        post.remove()
    per_call = [checks[i] + checks[i + 1] for i in range(0, len(checks), 2)]
    return per_call, calls


def pipeline_seconds(pipe, checks: bool) -> float:
    a, b = integration.check_processors, integration.check_caller
    if not checks:
        integration.check_processors = integration.check_caller = lambda *args: None
    try:
        start = time.perf_counter()
        pipe(**RUN, generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start
    finally:
        integration.check_processors, integration.check_caller = a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = vs.load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    acc = vs.accelerate(pipe, attention="dense")
    try:
        pipe(**RUN, generator=torch.Generator().manual_seed(0))  # warm-up
        checks, calls = check_and_call_times(pipe)
        print(f"checks per transformer call: median {statistics.median(checks) * 1e6:.1f} us "
              f"(max {max(checks) * 1e6:.1f}); transformer call: median {statistics.median(calls) * 1e3:.2f} ms; "
              f"share {statistics.median(checks) / statistics.median(calls):.2%} over {len(calls)} calls")
        ratios = []
        for _ in range(args.repeats):  # alternated: without the checks, then with them
            without, with_checks = pipeline_seconds(pipe, False), pipeline_seconds(pipe, True)
            ratios.append(with_checks / without)
        print(f"pipeline call with / without checks: median {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}] over {args.repeats} alternated pairs")
    finally:
        acc.remove()


if __name__ == "__main__":
    main()
