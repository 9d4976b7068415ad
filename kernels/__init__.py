"""Attention kernels (installed as ``vdit_sparse.kernels``); the tests compare each with a PyTorch reference."""

if __name__ == "kernels":
    # Imported under the top-level name ``kernels``: Python was started in a source checkout's root, so
    # this folder shadows PyPI's ``kernels`` package, which transformers imports. That name is not
    # ours (an install maps this folder to vdit_sparse.kernels): hand the import over to the real one.
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _elsewhere = [p for p in sys.path if Path(p or ".").resolve() != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real  # the import system returns what sys.modules holds once this file has run
    _spec.loader.exec_module(_real)
else:
    from .dispatch import block_sparse_attention

    __all__ = ["block_sparse_attention"]
