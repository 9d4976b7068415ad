"""A static block window, and a looser First-Block Cache: what another package adds through vdit-sparse's
public API and two entry points, touching none of vdit-sparse's files."""

from dataclasses import dataclass

import torch

from vdit_sparse.caches import StepCache
from vdit_sparse.methods import Method
from vdit_sparse.plan import from_block_mask
from vdit_sparse.settings import Settings, count, nonnegative, setting


@dataclass(frozen=True)
class BlockWindowSettings(Settings):
    method = "window"
    band: int = setting(1, count, "key blocks on each side of the query's block (0: the diagonal only)")


class BlockWindow(Method):
    name = "window"
    Settings = BlockWindowSettings
    summary = "a static band of key blocks around each query block (an example plugin)"
    knobs = {"band": (0, 1, 2)}

    def plan(self, q, k, ctx, settings, v=None):
        B, H, N, _ = q.shape
        n = -(-N // settings.block_size)
        i = torch.arange(n, device=q.device)
        mask = (i[:, None] - i[None, :]).abs() <= settings.band  # (n, n)
        return from_block_mask(mask.expand(B, H, n, n), (settings.block_size,) * 2, N), {}


@dataclass(frozen=True)
class LooseFirstBlock(StepCache):
    name = "loosefb"
    summary = "First-Block Cache with a looser default threshold (an example plugin)"
    data_dependent = True
    threshold: float = setting(0.3, nonnegative, "relative change of the first block's residual below which the rest is skipped")

    def config(self, pipe, adapter, num_steps):
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=self.threshold)
