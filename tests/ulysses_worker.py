"""Run by tests/test_parallel.py under ``torchrun --nproc-per-node 2`` (gloo, CPU): every scenario on one
device (rank 0, before parallelism) and with Ulysses degree 2, results saved by rank 0 to argv[1]."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, for tests.* helpers

import vdit_sparse as vs  # noqa: E402
from vdit_sparse import parallel  # noqa: E402
from vdit_sparse.pipelines import adapter_for  # noqa: E402

SEED = 0
WAN = {"steps": 4, "seed": SEED}  # svg / svg2 warm up 0.25 of the steps: one dense step
SVG = {"svg": {"density": 0.5, "block_size": 16}, "svg2": {"num_q_clusters": 4, "num_k_clusters": 4, "top_p": 0.5}}
JOINT = {"svg": {"density": 0.5, "block_size": 16, "warmup_steps": 0},  # direct calls announce no step count
         "svg2": {"num_q_clusters": 4, "num_k_clusters": 4, "top_p": 0.5, "kmeans_iters_first": 5, "warmup_steps": 0}}
PATTERNS = ("spatial", "temporal", "dense")


def record_plans(acc, method: str) -> dict:
    """Per call (model, branch, step, layer): the per-head plan, (B, H, ...) over this rank's heads."""
    plans, plan = {}, acc.methods[method].plan

    def recording(q, k, ctx, settings, v=None):
        out, info = plan(q, k, ctx, settings, v=v)
        if method == "svg":
            per_head = torch.tensor([[PATTERNS.index(p) for p in row] for row in info["head_pattern"]])  # (B, H)
        else:
            per_head = torch.stack([info["q_labels"], info["k_labels"]], 2)  # (B, H, 2, V)
        first = ctx.heads[0] if ctx.heads else 0
        plans[(ctx.model, ctx.branch, ctx.step, ctx.layer)] = (first, per_head.cpu())
        return out, info

    acc.methods[method].plan = recording
    return plans


def all_heads(plans: dict, parallel_run: bool) -> dict:
    """Every rank's plans joined along the heads, on every rank (a one-device run's as they are)."""
    ranks = [None] * dist.get_world_size() if parallel_run else [plans]
    if parallel_run:
        dist.all_gather_object(ranks, plans)
    joined = {}
    for key in plans:
        parts = sorted((r[key] for r in ranks), key=lambda part: part[0])  # by first head
        joined[key] = torch.cat([p for _, p in parts], 1)
    return joined


def observe_shapes(acc) -> list:
    shapes = []
    acc.observe(lambda ctx, q, k, v, out, forced: shapes.append((tuple(q.shape), tuple(out.shape))))
    return shapes


def accelerated(target, run, parallel_run: bool, **kw) -> dict:
    acc = vs.accelerate(target, **kw)
    method = kw["attention"]
    try:
        plans = record_plans(acc, method) if method in SVG else {}
        shapes = observe_shapes(acc) if method in SVG else []
        out = run()
        table = acc.stats()
    finally:
        acc.remove()
    return {"out": torch.as_tensor(out), "plans": all_heads(plans, parallel_run), "shapes": shapes,
            "density": sum(r["density"] for r in table) / len(table)}


def one_and_two(results: dict, name: str, target, run, runs: dict, enable) -> None:
    """``runs`` (label -> accelerate's arguments) on one device (rank 0), then ``enable()`` and degree 2."""
    if parallel.is_main():
        results[f"{name}_one"] = {label: accelerated(target, run, False, **kw) for label, kw in runs.items()}
    dist.barrier()
    enable()
    results[f"{name}_two"] = {label: accelerated(target, run, True, **kw) for label, kw in runs.items()}


def wan(results: dict) -> None:
    from tests.conftest import run_tiny

    pipe = vs.load_pipeline("tiny", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    runs = {"dense": {}, "svg": SVG["svg"], "svg2": SVG["svg2"], "dense+tileskip": {"cache": "tileskip"},
            "svg2+tileskip": {**SVG["svg2"], "cache": "tileskip"}, "sta": {"tile": (1, 2, 2), "window": (0, 1, 0)}}
    runs = {label: {"attention": label.split("+")[0], **kw} for label, kw in runs.items()}
    # enabled before accelerate: our processors copy the stock ones' parallel config
    one_and_two(results, "wan", pipe, lambda: run_tiny(pipe, **WAN), runs, lambda: parallel.enable(pipe))


def joint(results: dict, name: str, target, run, config) -> None:
    """A joint-attention transformer, enabled after accelerate: enable_parallelism sets the config on ours."""
    runs = {m: {"attention": m, **JOINT.get(m, {})} for m in ("dense", "svg", "svg2")}

    def enable():
        acc = vs.accelerate(target, **runs["svg"])
        parallel.enable_on(target, config)
        acc.remove()
        stock = [m.processor for _, m in adapter_for(target).self_attention(target)]  # remove() hands the config back
        results[f"{name}_stock_config"] = [getattr(p, "_parallel_config", None) is not None for p in stock]

    one_and_two(results, name, target, run, runs, enable)


def hunyuan(results: dict, name: str, heads: int, anything: bool) -> None:
    from diffusers import ContextParallelConfig

    from tests.pipelines.test_hunyuan import build_transformer, inputs

    transformer, kw = build_transformer(num_attention_heads=heads), inputs()  # one prompt, 4 real text tokens of 6
    run = torch.no_grad()(lambda: transformer(**kw, return_dict=False)[0])
    config = ContextParallelConfig(ulysses_degree=2, mesh=parallel._group.mesh, ulysses_anything=anything)
    joint(results, name, transformer, run, config)


def cogvideox(results: dict) -> None:
    from diffusers import ContextParallelConfig

    from tests.pipelines.test_cogvideox import build_pipeline, inputs

    pipe = build_pipeline("1.0")
    transformer, kw = pipe.transformer, inputs(pipe)  # a batch of 2, 5 text tokens before 3 frames of 4 x 4
    run = torch.no_grad()(lambda: transformer(**kw, return_dict=False)[0])
    joint(results, "cogvideox", transformer, run, ContextParallelConfig(ulysses_degree=2, mesh=parallel._group.mesh))


def small_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(SEED)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=8,
        freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=32,
    ).eval()
    g = torch.Generator().manual_seed(SEED)
    kw = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g), timestep=torch.tensor([500]),
              encoder_hidden_states=torch.randn(1, 6, 8, generator=g))
    return transformer, torch.no_grad()(lambda: transformer(**kw, return_dict=False)[0])


def outcome(run):
    """The output of ``run()``, or the error it raised as "Type: message"."""
    try:
        return run()
    except Exception as e:  # diffusers' own ring attention may refuse the CPU backend: that is its answer
        return f"{type(e).__name__}: {e}"


def refusals(results: dict) -> None:
    """Ring attention: a sparse method is refused, dense passes through to diffusers; undivided heads without
    the "anything" mode are refused."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    from tests.pipelines.test_hunyuan import build_transformer

    ring, run = small_wan()
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("ring", "ulysses"))
    parallel.enable_on(ring, ContextParallelConfig(ring_degree=2, mesh=mesh))
    stock = outcome(run)
    acc = vs.accelerate(ring, attention="dense")
    results["ring_dense"] = (stock, outcome(run))
    acc.remove()
    odd = build_transformer(num_attention_heads=3)
    parallel.enable_on(odd, ContextParallelConfig(ulysses_degree=2, mesh=parallel._group.mesh))
    for key, transformer in (("ring", ring), ("odd_heads", odd)):
        try:
            vs.accelerate(transformer, attention="svg2").remove()
            results[key] = None
        except ValueError as e:
            results[key] = str(e)


def pretend_cuda_build_without_gpu() -> None:
    """What PyPI's default (CUDA) torch looks like on a machine without a GPU: its accelerator reads cuda while
    no CUDA device works (torch.cuda.is_available() stays False, the device count 0)."""
    cuda = torch.device("cuda")
    torch.accelerator.current_accelerator = lambda check_available=False: cuda
    torch._C._get_accelerator = lambda: cuda


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[2] == "--cuda-build":
        pretend_cuda_build_without_gpu()
    torch.manual_seed(SEED)
    parallel.start(2, "generate")
    results = {"seed": SEED}
    wan(results)
    hunyuan(results, "hunyuan", heads=2, anything=False)
    hunyuan(results, "hunyuan_3_heads", heads=3, anything=True)
    cogvideox(results)
    refusals(results)
    if parallel.is_main():
        torch.save(results, sys.argv[1])
    parallel.stop()


if __name__ == "__main__":
    main()
