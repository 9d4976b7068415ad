"""Count the "hops" a setting takes from the command line to the kernel: the calls of vdit-sparse's own functions
whose arguments carry the value, from ``vdit-sparse generate ... --density V`` until the first kernel call.

A call carries the value when one of its arguments (not ``self``) is the value, or holds it (a dict, a list or tuple, a
dataclass, an argparse namespace, a RunSpec ...; two levels deep). Usage::

    python scripts/count_hops.py            # prints each hop (file:function) and the totals
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile

MARK = 0.3717  # a density nothing else in a run uses
KERNEL_ENTRIES = ("run_plan", "block_sparse_attention", "block_sparse_attention_op")


def carries(value, depth: int = 3) -> bool:
    if isinstance(value, float):
        return value == MARK
    if depth == 0 or isinstance(value, (str, bytes, int, bool)) or value is None:
        return False
    if isinstance(value, dict):
        return any(carries(v, depth - 1) for v in list(value.values())[:64])
    if isinstance(value, (list, tuple)):
        return any(carries(v, depth - 1) for v in value[:64])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(carries(getattr(value, f.name, None), depth - 1) for f in dataclasses.fields(value))
    if type(value).__name__ == "Namespace":
        return any(carries(v, depth - 1) for v in vars(value).values())
    return False


def main() -> int:
    import vdit_sparse
    from vdit_sparse.cli import main as cli_main

    root = os.path.dirname(vdit_sparse.__file__)
    roots = (root, os.path.join(os.path.dirname(root), "kernels"), os.path.join(os.path.dirname(root), "pipelines"))
    hops, done = [], []

    def profile(frame, event, arg):
        if event != "call" or done:
            return
        path = frame.f_code.co_filename
        if not path.startswith(roots) or frame.f_code.co_name == "<module>":  # imports are not hops
            return
        where = os.path.relpath(path, os.path.dirname(root))
        if "kernels" in where.split(os.sep)[:2] and frame.f_code.co_name in KERNEL_ENTRIES:  # the walk ends here
            hops.append((where, frame.f_code.co_name, "kernel"))
            done.append(True)
            return
        code = frame.f_code
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x4) + bool(code.co_flags & 0x8)]
        if any(carries(frame.f_locals.get(n)) for n in names if n not in ("self", "cls")):  # arguments handed on
            hops.append((where, code.co_name, ""))

    out = os.path.join(tempfile.mkdtemp(), "v.mp4")
    argv = ["generate", "a red square moving right", "--attention", "svg", "--density", str(MARK), "--warmup-steps", "0",
            "--steps", "1", "--frames", "9", "--height", "64", "--width", "64", "--random-weights", "--out", out, "attention.block_size=16"]
    sys.setprofile(profile)
    try:
        cli_main(argv)
    finally:
        sys.setprofile(None)
    carried = [h for h in hops if not h[2]]
    print(" -> ".join(f"{where.removeprefix('vdit_sparse/')}:{name}" for where, name, _ in hops))
    print(f"hops carrying --density to the kernel: {len(carried)} calls of {len({h[:2] for h in carried})} functions "
          f"in {len({w for w, _, _ in carried})} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
