"""BlockPlan: *what* attention to compute, as plain tensors. One kernel runs any plan.

Tokens are seen in *plan order*: plan position ``i`` of batch·head ``g`` holds model token
``q_perm[g, i]`` (identity when ``q_perm`` is None; likewise ``k_perm`` for keys and values).
Plan order is cut into segments: query segment ``s`` covers plan positions
``q_offsets[g, s] : q_offsets[g, s + 1]``, key segment ``t`` covers ``k_offsets[g, t] : k_offsets[g, t + 1]``.
Query segment ``s`` attends to the ``kv_count[g, s]`` key segments listed in ``kv_index[g, s, :count]``;
every other (query, key) pair is skipped. Segments may have any size (clusters of unequal size);
uniform blocks are the special case ``offsets = arange * block``.

Memory is O(G · segments²) indices at most, never O(N²).

Builders: ``from_block_mask`` (a bool block mask, as FlexAttention's), ``full_plan``, ``from_head_patterns``
(each batch·head picks one of a few block masks, in its own token order: svg), ``from_clusters`` (clusters
as segments: svg2), and ``attach_text`` (dense text around any of them). Each records ``num_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from .layout import VideoLayout


@dataclass(repr=False)
class BlockPlan:
    q_offsets: torch.Tensor  # (G, Sq + 1) int32, non-decreasing, 0 .. N
    k_offsets: torch.Tensor  # (G, Sk + 1) int32, non-decreasing, 0 .. N
    kv_count: torch.Tensor  # (G, Sq) int32
    kv_index: torch.Tensor  # (G, Sq, L) int32; entries at or past kv_count are ignored
    batch: int
    heads: int
    q_perm: torch.Tensor | None = None  # (G, N) int32: plan position -> model token
    k_perm: torch.Tensor | None = None  # (G, N) int32
    # N, given by the builder: reading it from q_offsets would wait for the device
    num_tokens: int = field(kw_only=True)

    @property
    def groups(self) -> int:
        return self.batch * self.heads

    def to(self, device) -> "BlockPlan":
        """The same plan with every tensor on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: t.to(device) for name, t in values.items() if isinstance(t, torch.Tensor)})

    def __repr__(self) -> str:
        perms = "+".join(side for side, perm in (("q", self.q_perm), ("k", self.k_perm)) if perm is not None)
        density = self.density().mean()
        shown = "?" if density.is_meta else f"{float(density):.4f}"
        return (
            f"BlockPlan(batch={self.batch}, heads={self.heads}, num_tokens={self.num_tokens}, "
            f"q_segments={self.q_offsets.shape[1] - 1}, k_segments={self.k_offsets.shape[1] - 1}, "
            f"permuted={perms or 'no'}, mean_density={shown}, device={self.kv_index.device})"
        )

    def valid_entries(self) -> torch.Tensor:
        """(G, Sq, L) bool: the kv_index entries that are listed (before kv_count)."""
        return torch.arange(self.kv_index.shape[2], device=self.kv_index.device) < self.kv_count[..., None]

    def pairs(self, entries: torch.Tensor | None = None) -> torch.Tensor:
        """(G,) float32 (query, key) token pairs in the ``entries`` (G, Sq, L) bool; default: every listed one."""
        entries = self.valid_entries() if entries is None else entries
        q_sizes = self.q_offsets.diff(dim=1).float()  # (G, Sq)
        k_sizes = self.k_offsets.diff(dim=1).float()  # (G, Sk)
        idx = self.kv_index.long().clamp(0, k_sizes.shape[1] - 1)
        kept = torch.gather(k_sizes[:, None, :].expand(-1, idx.shape[1], -1), 2, idx) * entries  # (G, Sq, L)
        return (kept.sum(2) * q_sizes).sum(1)

    def density(self) -> torch.Tensor:
        """(B, H) float32: computed (query, key) pairs over N², counted exactly from segment sizes."""
        return (self.pairs() / float(self.num_tokens) ** 2).view(self.batch, self.heads)

    def drop(self, skip: torch.Tensor) -> "BlockPlan":
        """The plan without the listed entries; ``skip`` (G, Sq, L) bool marks kv_index entries to remove."""
        keep = self.valid_entries() & ~skip
        # stable sort moves kept entries to the front, in their original order
        order = torch.sort((~keep).to(torch.int8), dim=2, stable=True).indices
        kv_index = torch.gather(self.kv_index, 2, order)
        return replace(self, kv_index=kv_index.contiguous(), kv_count=keep.sum(2).to(torch.int32))

    def validate(self, num_tokens: int | None = None) -> None:
        """Raise ValueError when the tensors do not describe a well-formed plan (of ``num_tokens`` tokens, if given)."""
        G, n = self.groups, self.num_tokens
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"BlockPlan.num_tokens: expected an int >= 0, got {n!r}")
        if num_tokens is not None and n != num_tokens:
            raise ValueError(f"BlockPlan.num_tokens: {n}, but the plan is checked against {num_tokens} tokens")
        for name in ("q_offsets", "k_offsets", "kv_count", "kv_index"):
            t = getattr(self, name)
            if t.dtype != torch.int32 or t.shape[0] != G:
                raise ValueError(f"BlockPlan.{name}: expected int32 with first dim {G}, got {t.dtype} {tuple(t.shape)}")
        for name in ("q_offsets", "k_offsets"):
            off = getattr(self, name)
            if (off[:, 0] != 0).any() or (off[:, -1] != n).any() or (off.diff(dim=1) < 0).any():
                raise ValueError(f"BlockPlan.{name}: must rise from 0 to {n} in every row")
        Sq, Sk = self.q_offsets.shape[1] - 1, self.k_offsets.shape[1] - 1
        if self.kv_count.shape != (G, Sq) or self.kv_index.shape[:2] != (G, Sq):
            raise ValueError(f"BlockPlan.kv_count/kv_index: expected leading shape ({G}, {Sq})")
        if (self.kv_count < 0).any() or (self.kv_count > self.kv_index.shape[2]).any():
            raise ValueError("BlockPlan.kv_count: must lie in [0, kv_index.shape[2]]")
        listed = self.kv_index[self.valid_entries()]
        if listed.numel() and (listed.min() < 0 or listed.max() >= Sk):
            raise ValueError(f"BlockPlan.kv_index: listed key segments must lie in [0, {Sk})")
        for name in ("q_perm", "k_perm"):
            perm = getattr(self, name)
            if perm is None:
                continue
            if perm.shape != (G, n) or perm.dtype != torch.int32:
                raise ValueError(f"BlockPlan.{name}: expected int32 ({G}, {n}), got {perm.dtype} {tuple(perm.shape)}")
            if not torch.equal(perm.sort(dim=1).values, torch.arange(n, device=perm.device, dtype=perm.dtype).expand(G, n)):
                raise ValueError(f"BlockPlan.{name}: every row must be a permutation of 0..{n - 1}")

    def to_dense(self) -> torch.Tensor:
        """(B, H, Sq, Sk) bool: which key segments each query segment computes (segment ids, as listed)."""
        G, Sq, _ = self.kv_index.shape
        Sk = self.k_offsets.shape[1] - 1
        sel = torch.zeros(G, Sq, Sk + 1, dtype=torch.bool, device=self.kv_index.device)
        idx = torch.where(self.valid_entries(), self.kv_index.long(), Sk)  # entries not listed go to a spare column
        sel.scatter_(2, idx, True)
        return sel[..., :Sk].reshape(self.batch, self.heads, Sq, Sk)

    def token_mask(self) -> torch.Tensor:
        """(B, H, N, N) bool in model order. O(N²): for tests and references at small N only."""
        G, n = self.groups, self.num_tokens
        Sk = self.k_offsets.shape[1] - 1
        q_seg = segment_ids(self.q_offsets, n)  # (G, N) plan position -> segment
        k_seg = segment_ids(self.k_offsets, n)
        sel = self.to_dense().view(G, -1, Sk)  # (G, Sq, Sk)
        plan_mask = torch.gather(sel, 1, q_seg.long()[..., None].expand(-1, -1, Sk))  # (G, N, Sk)
        plan_mask = torch.gather(plan_mask, 2, k_seg.long()[:, None, :].expand(-1, n, -1))  # (G, N, N)
        if self.q_perm is not None:  # plan row i is model row q_perm[i]
            out = torch.empty_like(plan_mask)
            out.scatter_(1, self.q_perm.long()[..., None].expand(-1, -1, n), plan_mask)
            plan_mask = out
        if self.k_perm is not None:
            out = torch.empty_like(plan_mask)
            out.scatter_(2, self.k_perm.long()[:, None, :].expand(-1, n, -1), plan_mask)
            plan_mask = out
        return plan_mask.view(self.batch, self.heads, n, n)


def segment_ids(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """(G, N) int64: the segment each plan position falls in, for segment boundaries ``offsets`` (G, S + 1)."""
    pos = torch.arange(n, device=offsets.device, dtype=offsets.dtype).expand(offsets.shape[0], n).contiguous()
    return torch.searchsorted(offsets[:, 1:].contiguous(), pos, right=True).long()


def plan_order(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """(G, N, D) rows of x (G, N, D) in plan order: plan position i holds model token perm[g, i]."""
    return x if perm is None else torch.gather(x, 1, perm.long()[..., None].expand(-1, -1, x.shape[2]))


def uniform_offsets(n: int, block: int, groups: int, device=None) -> torch.Tensor:
    """(groups, ceil(n / block) + 1) int32 boundaries of equal blocks; the last block may be short."""
    edges = torch.arange(0, n + block, block, device=device).clamp_max(n)[: -(-n // block) + 1]
    return edges.to(torch.int32).expand(groups, -1).contiguous()


def from_block_mask(block_mask: torch.Tensor, block_size: tuple[int, int], num_tokens: int) -> BlockPlan:
    """A plan from a boolean (B, H, ceil(N/BM), ceil(N/BN)) block mask over model order."""
    if block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise ValueError(f"block_mask: expected a 4-D bool tensor (B, H, Nq_blocks, Nk_blocks), got {block_mask.dtype} {tuple(block_mask.shape)}")
    BM, BN = block_size
    B, H, nq, nk = block_mask.shape
    if nq != -(-num_tokens // BM) or nk != -(-num_tokens // BN):
        raise ValueError(
            f"block_mask shape {tuple(block_mask.shape)}: with N={num_tokens} and block_size=({BM}, {BN}) "
            f"expected (B, H, {-(-num_tokens // BM)}, {-(-num_tokens // BN)})"
        )
    G = B * H
    m = block_mask.reshape(G, nq, nk)
    kv_count = m.sum(2).to(torch.int32)
    # selected key blocks first, in ascending order
    order = torch.sort((~m).to(torch.int8), dim=2, stable=True).indices.to(torch.int32)
    width = max(int(kv_count.max()) if kv_count.numel() else 0, 1)
    return BlockPlan(
        q_offsets=uniform_offsets(num_tokens, BM, G, block_mask.device),
        k_offsets=uniform_offsets(num_tokens, BN, G, block_mask.device),
        kv_count=kv_count,
        kv_index=order[..., :width].contiguous(),
        batch=B,
        heads=H,
        num_tokens=num_tokens,
    )


def attach_text(plan: BlockPlan, layout: VideoLayout, text_block: int = 64, *, text_lengths=None) -> BlockPlan:
    """Extend a plan over the video tokens alone to the whole sequence, with text computed densely.

    Text tokens keep their place in plan order (before or after the video part), cut into blocks of
    ``text_block``; every video query segment also attends to all text key segments, and every text
    query segment attends to every key segment. ``plan`` positions and perms are video-local.

    ``text_lengths`` (B,) ints, optional: how many leading text tokens of each batch item are real,
    the rest being padding (HunyuanVideo pads prompts and masks the padding keys). Padding keys then
    sit in one key segment per batch·head that no query lists, so they get no attention; padding
    query rows attend every real key, as in the masked dense call.
    """
    if plan.num_tokens != layout.video_tokens:
        raise ValueError(f"plan: covers {plan.num_tokens} tokens, but the layout has {layout.video_tokens} video tokens")
    if layout.text_tokens == 0:
        return plan
    T = layout.text_tokens
    lengths = [T] * plan.batch if text_lengths is None else [int(n) for n in torch.as_tensor(text_lengths).reshape(-1).tolist()]
    if len(lengths) != plan.batch or any(n < 0 or n > T for n in lengths):
        raise ValueError(f"text_lengths={text_lengths!r}: expected {plan.batch} counts in [0, {T}], one per batch item")
    return _attach_text(plan, layout, text_block, lengths)


def _attach_text(plan: BlockPlan, layout: VideoLayout, text_block: int, text_lengths: list[int]) -> BlockPlan:
    """``attach_text`` where only the first ``text_lengths[b]`` text tokens of batch item b are keys."""
    G, dev = plan.groups, plan.kv_index.device
    T, V = layout.text_tokens, layout.video_tokens
    lengths = torch.tensor(text_lengths, device=dev).repeat_interleave(plan.heads)  # (G,): groups are batch-major
    text_q = uniform_offsets(T, text_block, G, dev)  # (G, St + 1): padding queries stay ordinary text rows
    St, Sq, Sk = text_q.shape[1] - 1, plan.q_offsets.shape[1] - 1, plan.k_offsets.shape[1] - 1
    # key edges: the same blocks cut at the real length, then one padding segment [length, T)
    text_k = torch.cat([text_q.minimum(lengths[:, None].to(torch.int32)), text_q[:, -1:]], 1)  # (G, St + 2)
    listed = (lengths + text_block - 1) // text_block  # (G,) non-empty real text key segments
    before = layout.text_position == "before"
    if before:  # [text blocks, padding, video]
        q_off = torch.cat([text_q[:, :-1], plan.q_offsets + T], 1)
        k_off = torch.cat([text_k[:, :-1], plan.k_offsets + T], 1)
        video_k_ids, text_k_ids = torch.arange(St + 1, St + 1 + Sk, device=dev), torch.arange(St, device=dev)
    else:  # [video, text blocks, padding]
        q_off = torch.cat([plan.q_offsets, text_q[:, 1:] + V], 1)
        k_off = torch.cat([plan.k_offsets, text_k[:, 1:] + V], 1)
        video_k_ids, text_k_ids = torch.arange(Sk, device=dev), torch.arange(Sk, Sk + St, device=dev)
    L = plan.kv_index.shape[2]
    width = max(L + St, Sk + St)
    # video query rows: their own key segments (renumbered), then the real text segments
    vid_idx = torch.zeros(G, Sq, width, dtype=torch.int32, device=dev)
    vid_idx[..., :L] = video_k_ids.to(torch.int32)[plan.kv_index.long().clamp(0, Sk - 1)]
    pos = plan.kv_count[..., None].long() + torch.arange(St, device=dev)
    vid_idx.scatter_(2, pos, text_k_ids.to(torch.int32).expand(G, Sq, St))
    vid_count = plan.kv_count + listed[:, None].to(torch.int32)
    # text query rows: every video segment, then the real text segments
    txt_idx = torch.zeros(G, St, width, dtype=torch.int32, device=dev)
    txt_idx[..., : Sk + St] = torch.cat([video_k_ids, text_k_ids]).to(torch.int32)
    txt_count = (Sk + listed[:, None]).expand(G, St).to(torch.int32)
    rows = (txt_idx, vid_idx) if before else (vid_idx, txt_idx)
    counts = (txt_count, vid_count) if before else (vid_count, txt_count)

    def extend(perm):
        if perm is None:
            return None
        video = perm + layout.video_start
        text = torch.arange(layout.text_start, layout.text_start + T, device=dev, dtype=perm.dtype).expand(G, T)
        return torch.cat([text, video] if before else [video, text], 1).contiguous()

    return BlockPlan(
        q_offsets=q_off.contiguous(),
        k_offsets=k_off.contiguous(),
        kv_count=torch.cat(counts, 1).contiguous(),
        kv_index=torch.cat(rows, 1).contiguous(),
        batch=plan.batch,
        heads=plan.heads,
        q_perm=extend(plan.q_perm),
        k_perm=extend(plan.k_perm),
        num_tokens=plan.num_tokens + T,
    )


def full_plan(batch: int, heads: int, num_tokens: int, block: int = 64, device=None) -> BlockPlan:
    """Every block computed: density 1.0."""
    nb = -(-num_tokens // block)
    mask = torch.ones(batch, heads, nb, nb, dtype=torch.bool, device=device)
    return from_block_mask(mask, (block, block), num_tokens)


def from_head_patterns(masks: torch.Tensor, choice: torch.Tensor, block: int, num_tokens: int, orders=None) -> BlockPlan:
    """Each batch·head computes one of a few block masks, over its pattern's own token order.

    ``masks`` (P, nb, nb) bool over blocks of ``block`` tokens in plan order, nb = ceil(N / block);
    ``choice`` (B, H) int: the pattern of each batch·head; ``orders``: per pattern, None (model order)
    or an (N,) plan position -> token order that its queries and keys both take.
    """
    B, H = choice.shape
    P, dev = masks.shape[0], masks.device
    nb = -(-num_tokens // block)
    if masks.shape[1:] != (nb, nb):
        raise ValueError(f"masks: expected (P, {nb}, {nb}) for N={num_tokens} and block={block}, got {tuple(masks.shape)}")
    counts = masks.sum(-1).to(torch.int32)  # (P, nb) key blocks per query block
    cls = choice.flatten().long()  # (G,)
    used = torch.zeros(P, dtype=torch.long, device=dev).index_fill_(0, cls, 1)
    numbers = torch.cat([used, counts.amax(1).long()]).tolist()  # one device-to-host copy
    in_use = [p for p in range(P) if numbers[p]]
    width = max([1] + [numbers[P + p] for p in in_use])
    # listed key blocks first, ascending; only as wide as the widest pattern in use needs
    index = torch.sort((~masks).to(torch.int8), dim=-1, stable=True).indices[..., :width].to(torch.int32)  # (P, nb, width)
    perm = None
    if orders is not None and any(orders[p] is not None for p in in_use):
        identity = torch.arange(num_tokens, device=dev, dtype=torch.int32)
        table = torch.stack([identity if o is None else o.to(dev, torch.int32) for o in orders])  # (P, N)
        perm = table[cls].contiguous()  # (G, N)
    offsets = uniform_offsets(num_tokens, block, B * H, dev)
    return BlockPlan(
        q_offsets=offsets,
        k_offsets=offsets,
        kv_count=counts[cls].contiguous(),
        kv_index=index[cls].contiguous(),
        batch=B,
        heads=H,
        q_perm=perm,
        k_perm=perm,
        num_tokens=num_tokens,
    )


def from_clusters(q_labels, k_labels, q_sizes, k_sizes, selected, batch: int, heads: int) -> BlockPlan:
    """One segment per cluster, tokens sorted by cluster id (empty clusters are empty segments).

    ``q_labels`` / ``k_labels`` (G, N) int: each token's cluster; ``q_sizes`` (G, Cq) / ``k_sizes`` (G, Ck):
    tokens per cluster; ``selected`` (G, Cq, Ck) bool: the key clusters each query cluster computes.
    """
    G, Cq, Ck = selected.shape
    q_perm = q_labels.argsort(dim=1, stable=True).to(torch.int32)  # (G, N): plan position -> token
    k_perm = k_labels.argsort(dim=1, stable=True).to(torch.int32)
    zero = torch.zeros(G, 1, dtype=torch.int64, device=q_sizes.device)
    q_offsets = torch.cat([zero, q_sizes.cumsum(1)], 1).to(torch.int32)  # (G, Cq + 1)
    k_offsets = torch.cat([zero, k_sizes.cumsum(1)], 1).to(torch.int32)  # (G, Ck + 1)
    # selected key clusters first, in ascending id (contiguous memory); full width Ck avoids a host sync
    kv_index = (~selected).to(torch.int8).argsort(dim=2, stable=True).to(torch.int32)  # (G, Cq, Ck)
    return BlockPlan(
        q_offsets=q_offsets,
        k_offsets=k_offsets,
        kv_count=selected.sum(2).to(torch.int32),
        kv_index=kv_index.contiguous(),
        batch=batch,
        heads=heads,
        q_perm=q_perm.contiguous(),
        k_perm=k_perm.contiguous(),
        num_tokens=q_labels.shape[1],
    )
