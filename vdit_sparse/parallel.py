"""Several GPUs: Ulysses context parallelism over the processes torchrun starts.

``torchrun --nproc-per-node N -m vdit_sparse generate PROMPT --ulysses-degree N``: every process builds
the same pipeline and makes the same call from the same seed; diffusers' context-parallel hooks give
each process a shard of every transformer's sequence, and each self-attention exchanges the shards for
heads (``vdit_sparse.pipelines.ulysses``). One process per GPU (LOCAL_RANK) over NCCL; gloo on a CPU.
Only rank 0 writes files (``is_main``).

Here: joining the process group and building the device mesh (``start``), enabling parallelism on a
pipeline's transformers (``enable``, ``enable_on``), which rank writes (``is_main``, ``main_store``),
and leaving again (``stop``, also at exit).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass

import torch

from .errors import UserError

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class UlyssesGroup:
    """This process's place among the Ulysses ranks, and the ("ring", "ulysses") = (1, degree) mesh."""

    degree: int
    rank: int
    mesh: object  # torch.distributed.device_mesh.DeviceMesh


_group: UlyssesGroup | None = None  # the process's group: one per process, as torch.distributed's default group


def launched() -> bool:
    """Whether torchrun (or a launcher that sets the same variables) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def start(degree: int, command: str = "generate") -> UlyssesGroup | None:
    """Join torchrun's processes as ``degree`` Ulysses ranks; None for one process. Left again at exit."""
    global _group
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise UserError(f"--ulysses-degree {degree!r}: must be a positive integer (1: one device)")
    world = int(os.environ["WORLD_SIZE"]) if launched() else 1
    if degree == 1 and world == 1:
        return None
    if not launched():
        raise UserError(
            f"--ulysses-degree {degree}: needs {degree} processes, one per GPU; launch with: "
            f"torchrun --nproc-per-node {degree} -m vdit_sparse {command} ... --ulysses-degree {degree}"
        )
    if degree != world:
        raise UserError(f"--ulysses-degree {degree}: torchrun started {world} processes; give --ulysses-degree {world}")
    if _group is None:
        _group = _join(degree)
        atexit.register(stop)
    return _group


def _join(degree: int) -> UlyssesGroup:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available() or not (dist.is_gloo_available() or torch.cuda.is_available()):
        raise UserError("--ulysses-degree: this torch build has no torch.distributed backend (gloo or NCCL)")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this process's GPU
        backend, device_type = "nccl", "cuda"
    else:  # "cpu:gloo", not "gloo": diffusers then gathers sizes on the CPU instead of on
        # torch.accelerator.current_accelerator(), which is cuda on a CUDA build even where no GPU works
        backend, device_type = "cpu:gloo", "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    mesh = init_device_mesh(device_type, (1, degree), mesh_dim_names=("ring", "ulysses"))
    return UlyssesGroup(degree, dist.get_rank(), mesh)


def stop() -> None:
    """Leave the process group, all ranks together (nothing without one)."""
    global _group
    import torch.distributed as dist

    if _group is not None and dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing files: nobody tears the connections down under it
        dist.destroy_process_group()
    _group = None


def degree() -> int:
    return _group.degree if _group is not None else 1


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def from_main(value):
    """Rank 0's ``value`` on every rank (so all ranks take the same branches); ``value`` without a group."""
    if _group is None:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_store(store):
    """``store`` (has, save, load) as rank 0 sees it, on every rank: ``has`` answers rank 0's answer and
    ``save`` writes on rank 0 only, so all ranks make the same runs in the same order. ``store`` itself
    without a group."""
    return store if _group is None else _MainStore(store)


class _MainStore:
    def __init__(self, store):
        self.store = store

    def has(self, key: str) -> bool:
        return from_main(self.store.has(key) if is_main() else None)

    def save(self, *args, **kwargs) -> None:
        if is_main():
            self.store.save(*args, **kwargs)

    def load(self, key: str):
        return self.store.load(key)


def check_degree(heads: int, degree: int) -> None:
    """Refuse a degree whose head shares diffusers cannot make: heads a degree does not divide are padded to
    ceil(heads / degree) per rank ("anything" mode), which works only while the padding is smaller than one
    rank's share (6 heads: 1, 2, 3 and 6 work; 4 and 5 do not)."""
    share = -(-heads // degree)
    if share * degree - heads >= share:
        works = [d for d in range(1, heads + 1) if -(-heads // d) * d - heads < -(-heads // d)]
        raise UserError(f"--ulysses-degree {degree}: the model's {heads} attention heads cannot be shared among "
                        f"{degree} ranks; use one of {', '.join(map(str, works))}")


def enable(pipe) -> None:
    """Ulysses over this process's group on each of ``pipe``'s transformers not yet parallel (nothing without a group).

    Heads that do not divide among the ranks take diffusers' "anything" mode (uneven shares).
    """
    if _group is None:
        return
    from diffusers import ContextParallelConfig

    from .integration import transformers_of

    for _, transformer in transformers_of(pipe):
        if getattr(transformer, "_parallel_config", None) is not None:
            continue  # a pipeline reused across runs is enabled once
        heads = transformer.config.num_attention_heads
        check_degree(heads, _group.degree)
        anything = heads % _group.degree != 0
        config = ContextParallelConfig(ulysses_degree=_group.degree, mesh=_group.mesh, ulysses_anything=anything)
        enable_on(transformer, config)


def enable_on(transformer, config) -> None:
    """``transformer.enable_parallelism(config)`` with its family's plan (pipelines' adapters), on a CPU too."""
    from .pipelines import adapter_for

    plan = adapter_for(transformer).context_parallel_plan()
    with _one_device_without_accelerator():
        transformer.enable_parallelism(config=config, cp_plan=plan)


@contextlib.contextmanager
def _one_device_without_accelerator():
    # diffusers' _resolve_parallel_config picks each rank's device as rank % torch.accelerator.device_count(),
    # which divides by zero on a machine without an accelerator (CPU and gloo); there the one device is the
    # CPU, so the count reads 1 while parallelism is enabled. The only workaround of its kind: keep it here.
    count = torch.accelerator.device_count
    if count() > 0:
        yield
        return
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count
