"""A non-editable wheel holds kernels/, pipelines/ and configs/ inside vdit_sparse, nothing top-level."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A regular (non-editable) wheel of the checkout, as ``pip install .`` builds it."""
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    (path,) = out.glob("vdit_sparse-*.whl")
    return path


def test_wheel_maps_kernels_pipelines_and_configs_into_the_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"vdit_sparse", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "vdit_sparse/kernels/block_sparse_attention.py" in names
    assert "vdit_sparse/pipelines/wan.py" in names
    for yaml in ("config.yaml", "model/tiny.yaml", "model/tiny-long.yaml"):
        assert f"vdit_sparse/configs/{yaml}" in names
    assert "vdit_sparse/data/tiny/transformer/diffusion_pytorch_model.safetensors" in names


def test_an_installed_wheel_finds_its_trained_weights(wheel, tmp_path):
    """``pip install .`` puts the weights at site-packages/vdit_sparse/data/tiny; the loader once looked in
    site-packages/vdit_sparse/vdit_sparse/data/tiny (right only in a checkout) and drew noise from random weights."""
    import hashlib
    import json

    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    code = (
        "import json, vdit_sparse as vs\n"
        "from vdit_sparse.pipelines.tiny import weights_info\n"
        "pipe = vs.load_pipeline('tiny')\n"
        "print(json.dumps({'package': vs.__file__, 'weights': weights_info('tiny'),"
        " 'std': pipe.vae.config.latents_std[0]}))"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(found["weights"]["source"]) == site / "vdit_sparse" / "data" / "tiny" and found["weights"]["trained"]
    shipped = ROOT / "vdit_sparse" / "data" / "tiny" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert found["weights"]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert found["std"] != 1.0  # the fitted autoencoder, not a random stand-in


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
