"""scripts/bench_e2e.py runs end to end (tiny shapes, CPU): the GPU run then only has to be called."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_e2e.py"


def test_rows_are_ratios_against_dense_compiled_from_the_same_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    argv = ["--shape", "tiny-hunyuan", "--device", "cpu", "--smoke", "--repeats", "1", "--methods", "svg2",
            "--densities", "0.5", "--json", str(out)]
    assert bench.main(argv) == 0
    rows = json.loads(out.read_text())
    assert {(r["compiled"], r["method"]) for r in rows} == {(c, m) for c in (False, True) for m in ("dense", "svg2")}
    base = next(r for r in rows if r["compiled"] and r["method"] == "dense")
    assert base["speedup_vs_dense_compiled"] == 1.0
    sparse = [r for r in rows if r["method"] == "svg2"]
    assert all(0.3 < r["density"] < 0.7 for r in sparse)  # fixed budget 0.5, text rows dense
    assert all(0 < r["attention_share"] <= 1.0 for r in rows)
