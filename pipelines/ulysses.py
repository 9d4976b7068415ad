"""Ulysses inside our processors: q, k, v from a shard of the sequence to the whole sequence, and back.

Under diffusers' context parallelism (``transformer.enable_parallelism(ContextParallelConfig(
ulysses_degree=N))``) each rank holds a shard of the sequence with every head. A method plans over the
whole sequence, so a processor exchanges q, k, v for the whole sequence of this rank's heads with
diffusers' own all-to-all, lets the handle attend there, and exchanges the output back.

Which heads: rank r always holds the same heads, r·H/N up to (r+1)·H/N (the all-to-all's layout; in
diffusers' "anything" mode the last rank holds fewer). So the handle of one rank, keyed by (branch,
model, layer), always keeps the state of the same heads; ``head_range`` tells a method which they are.

Token order: the video is sharded in order (rank r holds chunk r, as ``tensor.tensor_split`` cuts it);
joint-attention text is not split by our plans (``Adapter.context_parallel_plan``): every rank holds
all of it. After the all-to-all the sequence is every rank's local one in rank order, [v0; t; v1; t]
for [video; text]; the exchange takes the single-device order [v0; v1; t] from it, so the layout the
handle sees is the one device's, and hands each rank's rows back the same way.
"""

from __future__ import annotations

import functools

import torch

from vdit_sparse.layout import TEXT_POSITIONS


def context_parallel(parallel_config):
    """The ContextParallelConfig of a processor's ``_parallel_config`` when it spans ranks, else None."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None or cp.ring_degree * cp.ulysses_degree == 1:
        return None
    return cp


def check_supported(cp, heads: int, what: str = "q") -> None:
    """Raise unless our processors can attend over the whole sequence under ``cp``, with ``heads`` heads."""
    if cp.ring_degree > 1:
        raise ValueError(
            f"ContextParallelConfig ring_degree={cp.ring_degree}: ring attention leaves each rank a shard of the keys, "
            "so no sparse method can plan over the sequence; use Ulysses (ulysses_degree=N, --ulysses-degree N)"
        )
    if heads % cp.ulysses_degree and not cp.ulysses_anything:
        raise ValueError(
            f"{what}: {heads} heads do not divide among ulysses_degree={cp.ulysses_degree} ranks; use a degree that "
            f"divides {heads}, or ContextParallelConfig(ulysses_anything=True)"
        )


def shard_sizes(tokens: int, ranks: int) -> list[int]:
    """Tokens of each rank's shard, as ``tensor_split`` cuts them (equal when ``ranks`` divides ``tokens``)."""
    return [tokens // ranks + (r < tokens % ranks) for r in range(ranks)]


@functools.lru_cache(maxsize=64)
def token_orders(video: int, text: int, ranks: int, position: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gather, spread) int64 indices between the ranks' concatenated local sequences and the one-device order.

    ``spread`` (ranks·text + video,): the one-device position of each concatenated row; ``gather``
    (video + text,): for each one-device position, its row in the concatenation (rank 0's copy of text).
    """
    if position not in TEXT_POSITIONS:
        raise ValueError(f"text_position={position!r}: must be one of {', '.join(TEXT_POSITIONS)}")
    video_start, text_start = (text, 0) if position == "before" else (0, video)
    text_rows = torch.arange(text_start, text_start + text)  # (T,)
    pieces, done = [], 0
    for size in shard_sizes(video, ranks):
        shard = torch.arange(video_start + done, video_start + done + size)  # (V_r,)
        pieces += [text_rows, shard] if position == "before" else [shard, text_rows]
        done += size
    spread = torch.cat(pieces)  # (ranks·T + V,)
    rows = torch.arange(spread.numel())
    gather = torch.full((video + text,), spread.numel()).scatter_reduce(0, spread, rows, "amin")  # (V + T,)
    return gather.to(device), spread.to(device)


class SequenceExchange:
    """One call's all-to-alls: (B, S_local, H, D) on each rank <-> (B, S, H_local, D) in one-device order.

    ``text`` tokens at ``position`` (see TEXT_POSITIONS) are whole on every rank; the rest is this rank's
    shard of the video.
    """

    def __init__(self, cp, local_shape: torch.Size, text: int = 0, position: str = "none"):
        self.group = cp._ulysses_mesh.get_group()
        self.ranks, self.rank = cp.ulysses_degree, cp._ulysses_local_rank
        self.anything = cp.ulysses_anything
        self.local_tokens, self.heads = local_shape[1], local_shape[2]
        self.text, self.position = text, position
        self.tokens: int | None = None  # the whole sequence's, known after the first exchange

    @property
    def head_range(self) -> tuple[int, int]:
        """(first, total): this rank's heads start at ``first`` of the model's ``total``."""
        return self.rank * -(-self.heads // self.ranks), self.heads

    @property
    def video_tokens(self) -> int:
        return self.tokens - self.text

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S_local, H, D) -> (B, S, H_local, D), the whole sequence in one-device order."""
        from diffusers.models.attention_dispatch import _all_to_all_dim_exchange, all_to_all_single_any_qkv_async

        if self.anything:
            out = all_to_all_single_any_qkv_async(x, self.group)()  # (B, ranks·T + V, H_local, D)
        else:
            out = _all_to_all_dim_exchange(x, scatter_idx=2, gather_idx=1, group=self.group)
        self.tokens = out.shape[1] - (self.ranks - 1) * self.text
        gather = self._orders(out.device)[0]
        return out if gather is None else out.index_select(1, gather)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H_local, D) in one-device order -> (B, S_local, H, D), this rank's rows with every head."""
        from diffusers.models.attention_dispatch import _all_to_all_dim_exchange, all_to_all_single_any_o_async

        spread = self._orders(x.device)[1]
        x = x if spread is None else x.index_select(1, spread)  # (B, ranks·T + V, H_local, D)
        if self.anything:
            return all_to_all_single_any_o_async(x, self.group, NUM_QO_HEAD=self.heads, Q_S_LOCAL=self.local_tokens)()
        return _all_to_all_dim_exchange(x.contiguous(), scatter_idx=1, gather_idx=2, group=self.group)

    def _orders(self, device):
        if self.text == 0:  # the video shards in rank order are already the one-device order
            return None, None
        return token_orders(self.video_tokens, self.text, self.ranks, self.position, str(device))
