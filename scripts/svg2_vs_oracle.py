"""svg2 against the published SVG2 algorithm (the test oracle, tests/methods/svg2_oracle.py), on captured q/k/v.

    python scripts/capture_qkv.py --model tiny --out /tmp/qkv-tiny.pt
    python scripts/svg2_vs_oracle.py /tmp/qkv-tiny.pt --report /tmp/svg2-oracle      # report.md, report.json

Each (branch, layer) is replayed as a run would see it: its calls in step order from the first sparse step
(``--warmup``, a fraction of the steps as svg2's default), k-means cold at the first and warm-started after,
ours and the oracle each with their own state. Per call, against the dense output of the same q, k, v:

- **equal top_p**: ours at ``top_p`` p against the oracle at p (relative L2 error, realised density);
- **equal density**: ours in density mode at the oracle's realised density (the call's mean over heads).

The oracle draws random initial centroids: it runs with ``--oracle-seeds`` seeds and its errors and
densities are averaged over them. Ratios are ours / oracle of the mean errors over calls.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "methods"))  # the oracle lives with the tests that use it
sys.path.insert(0, str(ROOT / "scripts"))

from capture_qkv import load  # noqa: E402
from svg2_oracle import OracleSVG2  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("capture", type=Path, help="a file written by scripts/capture_qkv.py")
    p.add_argument("--top-p", type=float, nargs="+", default=[0.9])
    p.add_argument("--num-q-clusters", type=int, default=16)
    p.add_argument("--num-k-clusters", type=int, default=64)
    p.add_argument("--warmup", type=float, default=0.25, help="dense steps before the first sparse one (fraction)")
    p.add_argument("--oracle-seeds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one of our svg2 settings, e.g. num_sampled_rows=0 (repeatable)")
    p.add_argument("--report", type=Path, default=None, help="directory for report.json and report.md")
    return p.parse_args(argv)


def relative_error(approx, exact) -> float:
    return float((approx.float() - exact).norm() / exact.norm().clamp_min(1e-12))


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"null": None, "true": True, "false": False}.get(text, text)


class Ours:
    """Our svg2 over one (branch, layer), one method state per selection mode, as in a run."""

    def __init__(self, layout, settings: dict):
        from vdit_sparse.methods import get_method
        from vdit_sparse.methods import settings_for

        self.layout, self.method, self.states = layout, get_method("svg2")(), defaultdict(dict)
        self.settings = lambda **kw: settings_for("svg2", {**settings, **kw})

    def __call__(self, call, mode: str, **kw):
        from vdit_sparse.attention import run_method
        from vdit_sparse.methods import AttentionContext

        ctx = AttentionContext(layout=self.layout, layer=call["layer"], step=call["step"], num_steps=call["num_steps"],
                               branch=call["branch"], state=self.states[mode])
        out, info = run_method(call["q"], call["k"], call["v"], ctx, self.method, self.settings(**kw))
        return out, float(info["density"].float().mean())


def dense(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@torch.no_grad()
def replay(record: dict, args, ours_settings: dict) -> list[dict]:
    """One row per (call, top_p): errors and densities of ours and the oracle."""
    from vdit_sparse.layout import VideoLayout

    layout = VideoLayout(**record["layout"])
    first = int(round(args.warmup * record["meta"]["num_steps"]))
    groups = defaultdict(list)
    for call in record["calls"]:
        if call["step"] >= first:
            groups[(call["branch"], call["layer"])].append(call)
    counts = dict(num_q_clusters=args.num_q_clusters, num_k_clusters=args.num_k_clusters)
    rows = []
    for (branch, layer), calls in sorted(groups.items()):
        ours = {p: Ours(layout, {**counts, **ours_settings, "top_p": p}) for p in args.top_p}
        oracles = {(p, s): OracleSVG2(**counts, top_p=p, seed=s) for p in args.top_p for s in range(args.oracle_seeds)}
        for call in sorted(calls, key=lambda c: c["step"]):
            call = {**call, **{n: call[n].float() for n in "qkv"}}
            exact = dense(call["q"], call["k"], call["v"]).float()
            B, H, N, D = call["q"].shape
            flat = [call[n].reshape(B * H, N, D) for n in "qkv"]
            for p in args.top_p:
                oracle_err, oracle_density = [], []
                for s in range(args.oracle_seeds):
                    out, density = oracles[(p, s)](*flat)
                    oracle_err.append(relative_error(out.view(B, H, N, D), exact))
                    oracle_density.append(float(density.mean()))
                o_err, o_den = sum(oracle_err) / len(oracle_err), sum(oracle_density) / len(oracle_density)
                out_p, den_p = ours[p](call, "top_p")
                out_d, den_d = ours[p](call, "density", density=o_den)
                rows.append(dict(branch=branch, layer=layer, step=call["step"], top_p=p, oracle_error=o_err,
                                 oracle_density=o_den, ours_error=relative_error(out_p, exact), ours_density=den_p,
                                 ours_error_at_density=relative_error(out_d, exact), ours_density_at_density=den_d))
    return rows


def mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def summarize(rows: list[dict]) -> dict:
    """Per top_p: the mean errors and densities over calls, and ours / oracle of the mean errors."""
    out = {}
    for p in sorted({r["top_p"] for r in rows}):
        sel = [r for r in rows if r["top_p"] == p]
        m = {key: mean(r[key] for r in sel) for key in sel[0] if key.endswith(("error", "density", "at_density"))}
        m["ratio_top_p"] = m["ours_error"] / m["oracle_error"]
        m["ratio_density"] = m["ours_error_at_density"] / m["oracle_error"]
        m["calls_ours_worse_at_density"] = sum(r["ours_error_at_density"] > r["oracle_error"] for r in sel)
        m["calls"] = len(sel)
        out[str(p)] = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
    return out


def markdown(rows: list[dict], summary: dict, header: str) -> str:
    lines = [header, "", "| top_p | oracle error / density | ours, equal top_p: error / density | ratio | "
             "ours, equal density: error / density | ratio |", "|---|---|---|---|---|---|"]
    for p, m in summary.items():
        lines.append(f"| {p} | {m['oracle_error']:.4f} / {m['oracle_density']:.3f} | {m['ours_error']:.4f} / "
                     f"{m['ours_density']:.3f} | {m['ratio_top_p']:.3f}× | {m['ours_error_at_density']:.4f} / "
                     f"{m['ours_density_at_density']:.3f} | {m['ratio_density']:.3f}× |")
    lines += ["", "Per layer and step (both branches averaged): ours / oracle error, equal top_p | equal density", ""]
    for p in summary:
        by = defaultdict(list)
        for r in rows:
            if str(r["top_p"]) == p:
                by[(r["layer"], r["step"])].append(r)
        steps = sorted({s for _, s in by})
        lines += [f"top_p {p}:", "", "| layer | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for layer in sorted({l for l, _ in by}):
            cells = []
            for s in steps:
                sel = by.get((layer, s), [])
                o = mean(r["oracle_error"] for r in sel)
                cells.append(f"{mean(r['ours_error'] for r in sel) / o:.2f} \\| {mean(r['ours_error_at_density'] for r in sel) / o:.2f}"
                             if sel and o > 0 else "-")
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.capture.exists():
        raise SystemExit(f"capture={args.capture}: no such file; write one with scripts/capture_qkv.py")
    bad = [p for p in args.top_p if not 0 < p <= 1]
    if bad:
        raise SystemExit(f"--top-p={bad}: each must be in (0, 1]")
    ours_settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        ours_settings[key] = parse_value(value)
    torch.manual_seed(0)
    record = load(args.capture)
    rows = replay(record, args, ours_settings)
    summary = summarize(rows)
    header = (f"svg2 vs the published algorithm on {args.capture.name} ({record['meta']['model']}, "
              f"{len(rows) // len(args.top_p)} calls, {args.num_q_clusters} / {args.num_k_clusters} clusters, "
              f"ours: {ours_settings or 'defaults'}, oracle seeds {args.oracle_seeds})")
    text = markdown(rows, summary, header)
    print(text)
    if args.report:
        from vdit_sparse.atomicfile import atomic_write

        atomic_write(args.report / "report.json", json.dumps(dict(summary=summary, rows=rows, settings=ours_settings,
                                                                   meta=record["meta"]), indent=1))
        atomic_write(args.report / "report.md", text + "\n")
    return 0 if all(math.isfinite(m["ratio_top_p"]) for m in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
