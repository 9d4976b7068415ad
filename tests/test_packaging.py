"""A non-editable wheel holds kernels/, pipelines/ and configs/ inside vdit_sparse, nothing top-level."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_maps_kernels_pipelines_and_configs_into_the_package(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("vdit_sparse-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"vdit_sparse", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "vdit_sparse/kernels/block_sparse_attention.py" in names
    assert "vdit_sparse/pipelines/wan.py" in names
    for yaml in ("config.yaml", "model/tiny.yaml", "attention/dense.yaml", "cache/none.yaml"):
        assert f"vdit_sparse/configs/{yaml}" in names


def test_checkout_root_leaves_the_name_kernels_to_pypi():
    """Python started in the checkout's root must still import diffusers' Wan pipeline: transformers imports
    PyPI's ``kernels``, which this repository's kernels/ folder would otherwise shadow."""
    import importlib.metadata

    code = (
        "import vdit_sparse.kernels as ours, diffusers.pipelines.wan.pipeline_wan\n"
        "try:\n import kernels; print(kernels.__file__)\n"
        "except ModuleNotFoundError:\n print('absent')\n"
        "print(ours.__file__)"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs, ours = run.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        assert theirs == "absent"
    else:
        assert ROOT not in Path(theirs).resolve().parents
