"""End-to-end transformer forward: dense eager / compiled against each method, ratios from one run.

One full forward of diffusers' WanTransformer3DModel or HunyuanVideoTransformer3DModel at a real
config with random weights (bf16 on CUDA). Every figure is a ratio against dense compiled from the same run, with the share of the time
spent in self-attention (the handle's CUDA-event timings) and the peak memory.

    vdit-sparse bench --e2e --shape wan-1.3b-480p              # GPU, all methods
    vdit-sparse bench --e2e --shape wan-14b-720p --layers 8    # as many layers as fit
    vdit-sparse bench --e2e --shape hunyuan-720p --layers 4
    vdit-sparse bench --e2e --shape tiny --device cpu --smoke   # checks the benchmark itself, on CPU
    python scripts/bench_e2e.py ...                            # the same, from a checkout

svg2 runs warm: one untimed forward runs the cold k-means, timed forwards use the warm start.
"""

from __future__ import annotations

import json
import sys

import torch

from ..errors import argument_parser

SHAPES = {
    # name: (family, transformer config, latent (frames, height, width)); Wan VAE: 4x time, 8x space
    "wan-1.3b-480p": ("wan", dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30), (21, 60, 104)),
    "wan-14b-720p": ("wan", dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40), (21, 90, 160)),
    # HunyuanVideo 720p x 129 frames: 33 latent frames of 45 x 80 tokens = 118,800 video tokens + text
    "hunyuan-720p": ("hunyuan", dict(num_layers=20, num_single_layers=40), (33, 90, 160)),
    "tiny": ("wan", dict(num_attention_heads=2, attention_head_dim=24, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32), (3, 8, 8)),
    "tiny-hunyuan": ("hunyuan", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)), (3, 8, 8)),
}


def build(shape: str, layers: int | None, device, dtype):
    """(model, forward kwargs) with random weights; ``layers`` caps the blocks (Hunyuan: double and single)."""
    family, cfg, (f, h, w) = SHAPES[shape]
    cfg = dict(cfg)
    torch.manual_seed(0)
    if family == "wan":
        from diffusers import WanTransformer3DModel

        if layers is not None:
            cfg["num_layers"] = layers
        cfg.setdefault("text_dim", 4096)
        model = WanTransformer3DModel(**cfg)
        text = 512 if not shape.startswith("tiny") else 16
        inputs = dict(
            hidden_states=torch.randn(1, 16, f, h, w), timestep=torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, text, cfg["text_dim"]),
        )
    else:
        from diffusers import HunyuanVideoTransformer3DModel

        if layers is not None:
            cfg["num_layers"], cfg["num_single_layers"] = layers, 2 * layers
        model = HunyuanVideoTransformer3DModel(**cfg)
        c = model.config
        text = 256 if not shape.startswith("tiny") else 6
        inputs = dict(
            hidden_states=torch.randn(1, c.in_channels, f, h, w), timestep=torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, text, c.text_embed_dim),
            encoder_attention_mask=torch.ones(1, text, dtype=torch.long),  # no padding: every call can be sparse
            pooled_projections=torch.randn(1, c.pooled_projection_dim), guidance=torch.tensor([6000.0]),
        )
    model = model.to(device=device, dtype=dtype).eval()
    cast = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() and k != "guidance" else v.to(device) for k, v in inputs.items()}
    return model, cast


def timed(model, inputs: dict, repeats: int, device):
    """(Series of one forward's seconds, load averages): ``repeats`` forwards after one untimed one, by
    vdit_sparse/timing.py's timer (the settings cannot alternate: each is its own accelerate() and compile)."""
    from ..timing import alternate

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward():
        model(**inputs)
        sync()  # the clock stops when the GPU is done; the previous forward's sync left it idle at the start

    with torch.inference_mode():
        sync()
        series, _, loads = alternate({"forward": forward}, repeats)
    return series["forward"], loads


def run(args) -> list[dict]:
    import vdit_sparse as vs
    from vdit_sparse.methods import get_method

    from ..timing import Series, Timings, cores, verdict

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, inputs = build(args.shape, args.layers, device, dtype)
    settings = [("dense", None, "none")]
    for method in args.methods:
        has_density = "density" in get_method(method).Settings.names()  # a method without one runs at its defaults
        for density in (args.densities if has_density else [None]):
            for cache in (("none", "tileskip") if args.tileskip else ("none",)):
                settings.append((method, density, cache))
    rows = []
    for compile_backend in ([False, "inductor"] if not args.smoke else [False, "aot_eager"]):
        for method, density, cache in settings:
            params = {"warmup_steps": 0} if density is None else {"density": density, "warmup_steps": 0}  # one forward: no warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            acc = vs.accelerate(model, attention=method, cache=cache, compile=compile_backend, **params)
            try:
                series, loads = timed(model, inputs, args.repeats, device)
                table = acc.stats()
            finally:
                acc.remove()
                torch._dynamo.reset()
            calls = [r for r in table if r["step"] > 0] or table  # the warm-up forward is step 0
            attn_ms = sum(r["ms"] for r in calls) / max(len({r["step"] for r in calls}), 1)
            ms = 1e3 * series.median
            rows.append({
                "compiled": bool(compile_backend), "method": method, "density_requested": density, "cache": cache,
                "ms": ms, "runs_s": list(series.seconds), "loads": list(loads), "attention_share": attn_ms / ms,
                "density": sum(r["density"] for r in calls) / max(len(calls), 1),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            })
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next(r for r in rows if r["compiled"] and r["method"] == "dense")
    for r in rows:  # the ratio of medians, its spread from the extreme forwards, and whether to trust it
        t = Timings(Series(tuple(base["runs_s"])), Series(tuple(r["runs_s"])), tuple(base["loads"] + r["loads"]),
                    cores())
        judged = verdict(t)
        r["speedup_vs_dense_compiled"] = judged.pop("speedup")
        r.update(judged)
    return rows


def density_notes(rows: list[dict], shape: str) -> list[str]:
    """Why a method realised a density far from the one asked: at a small shape its blocks are few, and a
    pattern rounded to whole blocks (svg's bands, svg2's cluster floor) cannot get below some share."""
    frames, height, width = SHAPES[shape][2]
    tokens = frames * (height // 2) * (width // 2)  # latent positions at the transformers' 2 x 2 patch
    far = sorted({(r["method"], r["density_requested"], round(r["density"], 3)) for r in rows
                  if r["density_requested"] is not None and abs(r["density"] - r["density_requested"]) > 0.1})
    return [f"{method} realised {got:.3f} for {asked} asked: the {shape} shape has {tokens} video tokens "
            f"(64-token blocks: {-(-tokens // 64)} per side), too few for that density; the GPU shapes have hundreds of blocks"
            for method, asked, got in far]


def main(argv=None) -> int:
    from vdit_sparse.methods import sparse_methods

    p = argument_parser(prog="vdit-sparse bench --e2e", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), help="default: wan-1.3b-480p, or tiny with --smoke")
    p.add_argument("--layers", type=int, help="layers to build (default: the model's)")
    p.add_argument("--methods", nargs="+", default=sparse_methods(), choices=sparse_methods())
    p.add_argument("--densities", nargs="+", type=float, default=[0.3, 0.15, 0.08])
    p.add_argument("--tileskip", action="store_true", help="also run each setting with cache=tileskip")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device")
    p.add_argument("--smoke", action="store_true", help="compile with aot_eager: checks the script, times nothing real")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    args.shape = args.shape or ("tiny" if args.smoke else "wan-1.3b-480p")  # a smoke check runs in seconds on a CPU
    if not args.smoke and (args.device or "cuda").startswith("cuda"):
        from . import require_cuda

        require_cuda("--e2e")
    rows = run(args)
    print(f"{'compiled':>8} {'method':>6} {'asked':>5} {'density':>7} {'cache':>8} {'ms':>9} {'x dense-c':>9} {'attn %':>6}  range")
    for r in rows:
        low, high = r["speedup_spread"]
        asked = "-" if r["density_requested"] is None else f"{r['density_requested']:.2f}"
        print(f"{r['compiled']!s:>8} {r['method']:>6} {asked:>5} {r['density']:7.3f} {r['cache']:>8} {r['ms']:9.2f} "
              f"{r['speedup_vs_dense_compiled']:9.2f} {100 * r['attention_share']:6.1f}  {low:.2f}-{high:.2f}"
              + ("" if r["timing_reliable"] else f"  unreliable: {'; '.join(r['timing_reasons'])}"))
    for note in density_notes(rows, args.shape):
        print(f"note: {note}")
    if args.json:
        from ..atomicfile import atomic_write_json

        atomic_write_json(args.json, rows)
    return 0
