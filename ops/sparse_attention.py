"""Block-sparse retrieval attention over the latent cache (OmniMem-style), in plain fp32 PyTorch.

Two functions, both used as they are on CPU and on a GPU:

* :func:`select_blocks` chooses, for every group of ``q_group`` consecutive queries and every group
  of heads, the ``top_k`` context blocks (``block_size`` tokens each) whose key summary scores highest
  against the group's query summary (mean key, or Quest's per-channel min/max bound).
* :func:`sparse_latent_attention_ref` is the reference of
  :func:`kernels.sparse_attention.sparse_latent_attention`: same arguments, same ``(o_lat, lse)``.

Keys are ``[context | chunk]``. Of the context ``[0, k_len)``, each (query group, head group) sees its
selected blocks plus the always-on local window ``[window_start, k_len)``; the chunk is always seen.

Adaptive window exclusion (OmniMem). Context blocks that end at or before ``local_start`` are
*long-range*; the other blocks with tokens before ``window_start`` are *local*. Local blocks leave the candidate set
only when at least ``top_k`` (minus forced sink blocks) live long-range blocks exist; with a short
history they stay candidates so the budget is not left empty. Blocks lying entirely inside the
always-on window are never candidates (they are attended anyway). ``local_start`` defaults to
``window_start``, in which case there are no local candidates and exclusion has nothing to remove.
"""

from __future__ import annotations

import torch

from ops.latent_attention import context_mask

SENTINEL = 2**31 - 1  # unused block-table entries: any read of one would fault


def _summaries(x: torch.Tensor, live: torch.Tensor, n_blocks: int, block_size: int, summary: str):
    """Per-block key summary. x: [B, S, D] fp32, live: [B, S] bool -> ([B, nb, D] ...,), [B, nb] count."""
    batch, s, d = x.shape
    pad = n_blocks * block_size - s
    # (B, S, D) -> (B, nb, bs, D)
    xb = torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(batch, n_blocks, block_size, d)
    lb = torch.nn.functional.pad(live, (0, pad)).reshape(batch, n_blocks, block_size, 1)
    count = lb.sum(2)  # (B, nb, 1)
    xb = torch.where(lb, xb, 0.0)  # NaN in unused slots never reaches a summary
    if summary == "mean":
        return (xb.sum(2) / count.clamp_min(1),), count[..., 0]
    big = torch.finfo(torch.float32).max
    k_max = torch.where(lb, xb, -big).amax(2)
    k_min = torch.where(lb, xb, big).amin(2)
    return (k_min, k_max), count[..., 0]


def select_blocks(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    *,
    top_k: int,
    block_size: int,
    q_group: int,
    head_group: int = 1,
    k_len: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    window_start: torch.Tensor | None = None,
    local_start: torch.Tensor | None = None,
    sink_len: int = 0,
    summary: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k context blocks per (query group, head group), with adaptive window exclusion.

    Args:
        q_lat: [B, S_q, H, d_c]; q_rope: [B, S_q, H, d_r] (rotated)
        ckv: [B, S_ctx, d_c]; k_rope: [B, S_ctx, d_r] (rotated)
        top_k: blocks to select per group (>= 0).
        block_size: tokens per block.
        q_group: consecutive queries sharing one selection; head_group: consecutive heads sharing one.
        k_len, k_valid: as in the attention functions (masked tokens never enter a summary).
        window_start: [B] int or None (= k_len): start of the always-on local window.
        local_start: [B] int or None (= window_start): start of the local region (see module docstring).
        sink_len: context tokens [0, sink_len) are always selected (counted in ``top_k``).
        summary: "mean" (query summary . mean key) or "minmax" (Quest: sum_d max(q_d min_d, q_d max_d)).
    Returns:
        block_idx: [B, H / head_group, ceil(S_q / q_group), top_k] int32, ascending, unused entries SENTINEL;
        block_cnt: [B, H / head_group, ceil(S_q / q_group)] int32.
    Raises:
        ValueError: on bad arguments.
    """
    if summary not in ("mean", "minmax"):
        raise ValueError(f"{summary=} must be 'mean' or 'minmax'")
    batch, s_q, heads, _ = q_lat.shape
    if head_group < 1 or heads % head_group or q_group < 1 or block_size < 1 or top_k < 0:
        raise ValueError(f"{head_group=} must divide H={heads}; {q_group=}, {block_size=} >= 1; {top_k=} >= 0")
    s_ctx, dev = ckv.shape[1], ckv.device
    n_qg, n_blocks, h_g = -(-s_q // q_group), -(-s_ctx // block_size), heads // head_group
    k_end = torch.full((batch,), s_ctx, device=dev) if k_len is None else k_len.to(dev).clamp(0, s_ctx)
    w_start = k_end if window_start is None else torch.minimum(window_start.to(dev).clamp_min(0), k_end)
    l_start = w_start if local_start is None else torch.minimum(local_start.to(dev).clamp_min(0), w_start)
    pos = torch.arange(s_ctx, device=dev)
    # a token counts for selection if valid and outside the always-on window
    live = context_mask(batch, s_ctx, dev, k_len, k_valid) & (pos[None, :] < w_start[:, None])
    keys = torch.cat([ckv, k_rope], dim=-1).float()  # (B, S_ctx, d_c + d_r)
    summ, count = _summaries(keys, live, n_blocks, block_size, summary)

    # query summary: mean over the group's queries, (B, S_q, H, D) -> (B, n_qg, H, D)
    q = torch.cat([q_lat, q_rope], dim=-1).float()
    q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, n_qg * q_group - s_q)).reshape(batch, n_qg, q_group, heads, -1)
    n_q = torch.clamp(s_q - torch.arange(n_qg, device=dev) * q_group, max=q_group)  # (n_qg,)
    q = q.sum(2) / n_q[None, :, None, None]
    if summary == "mean":
        score = torch.einsum("bghd,bnd->bghn", q, summ[0])
    else:
        k_min, k_max = summ
        score = torch.einsum("bghd,bnd->bghn", q.clamp_min(0), k_max) + torch.einsum(
            "bghd,bnd->bghn", q.clamp_max(0), k_min)
    # (B, n_qg, H, nb) -> (B, H_g, n_qg, nb): heads of a group add their scores
    score = score.reshape(batch, n_qg, h_g, head_group, n_blocks).sum(3).transpose(1, 2)

    blk_start = torch.arange(n_blocks, device=dev) * block_size
    is_live = count > 0  # (B, nb)
    is_sink = blk_start[None, :] < sink_len
    is_long = (blk_start[None, :] + block_size <= l_start[:, None]) & ~is_sink
    n_sink = (is_live & is_sink).sum(1)
    n_long = (is_live & is_long).sum(1)
    # adaptive window exclusion: local blocks compete only while long-range history is short
    exclude_local = n_long >= (top_k - n_sink).clamp_min(0)
    candidate = is_live & (is_sink | is_long | ~exclude_local[:, None])  # (B, nb)
    score = torch.where(candidate[:, None, None, :], score, float("-inf"))
    score = torch.where((candidate & is_sink)[:, None, None, :], float("inf"), score)

    k = min(top_k, n_blocks)
    top_val, top_idx = score.topk(k, dim=-1) if k > 0 else (score[..., :0], score[..., :0].long())
    chosen = top_val > float("-inf")
    cnt = chosen.sum(-1).to(torch.int32)
    idx = torch.where(chosen, top_idx, SENTINEL).sort(-1).values.to(torch.int32)
    out = torch.full((batch, h_g, n_qg, top_k), SENTINEL, dtype=torch.int32, device=dev)
    out[..., :k] = idx
    return out, cnt


def sparse_mask(
    batch: int, heads: int, s_q: int, s_ctx: int, block_idx: torch.Tensor, block_cnt: torch.Tensor, *,
    block_size: int, q_group: int, window_start=None, k_len=None, k_valid=None,
) -> torch.Tensor:
    """[B, H, S_q, S_ctx] bool: which context keys each (query, head) attends. Loops, for clarity.

    Raises:
        ValueError: if a used entry of ``block_idx`` repeats within its list.
    """
    dev = block_idx.device
    base = context_mask(batch, s_ctx, dev, k_len, k_valid)  # (B, S_ctx)
    k_end = torch.full((batch,), s_ctx, device=dev) if k_len is None else k_len.to(dev).clamp(0, s_ctx)
    w_start = k_end if window_start is None else torch.minimum(window_start.to(dev).clamp_min(0), k_end)
    pos = torch.arange(s_ctx, device=dev)
    window = pos[None, :] >= w_start[:, None]  # (B, S_ctx)
    mask = torch.zeros(batch, heads, s_q, s_ctx, dtype=torch.bool, device=dev)
    h_g, n_qg, k_sel = block_idx.shape[1:]
    group = heads // h_g
    for b in range(batch):
        for hg in range(h_g):
            for g in range(n_qg):
                n = int(block_cnt[b, hg, g].clamp(0, k_sel))
                used = block_idx[b, hg, g, :n].long()
                if used.unique().numel() != n:
                    raise ValueError(f"block_idx[{b}, {hg}, {g}] repeats a block: {used.tolist()}")
                sel = torch.zeros(s_ctx, dtype=torch.bool, device=dev)
                for blk in used.tolist():
                    if 0 <= blk * block_size < s_ctx:
                        sel[blk * block_size : (blk + 1) * block_size] = True
                rows = slice(g * q_group, min((g + 1) * q_group, s_q))
                mask[b, hg * group : (hg + 1) * group, rows] = ((sel & ~window[b]) | window[b]) & base[b]
    return mask


def sparse_latent_attention_ref(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    ckv: torch.Tensor,
    k_rope: torch.Tensor,
    scale: float,
    block_idx: torch.Tensor,
    block_cnt: torch.Tensor,
    *,
    block_size: int,
    q_group: int,
    window_start: torch.Tensor | None = None,
    k_len: torch.Tensor | None = None,
    k_valid: torch.Tensor | None = None,
    ckv_new: torch.Tensor | None = None,
    k_rope_new: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 reference of the block-sparse kernel; arguments and shapes as in
    :func:`kernels.sparse_attention.sparse_latent_attention`.

    Returns:
        o_lat: [B, S_q, H, d_c] in q_lat's dtype; lse: [B, S_q, H] fp32 (-inf where nothing is attended).
    """
    batch, s_q, heads, _ = q_lat.shape
    s_ctx = ckv.shape[1]
    mask = sparse_mask(batch, heads, s_q, s_ctx, block_idx, block_cnt, block_size=block_size, q_group=q_group,
                       window_start=window_start, k_len=k_len, k_valid=k_valid)
    keys, vals = torch.cat([ckv, k_rope], dim=-1).float(), ckv.float()  # (B, S_ctx, d_c + d_r), (B, S_ctx, d_c)
    if ckv_new is not None:
        keys = torch.cat([keys, torch.cat([ckv_new, k_rope_new], dim=-1).float()], dim=1)
        vals = torch.cat([vals, ckv_new.float()], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, heads, s_q, ckv_new.shape[1])], dim=-1)
    col_live = mask.any(2).any(1)  # (B, S_k): zero every slot nobody attends (they may hold NaN)
    keys = torch.where(col_live[..., None], keys, 0.0)
    vals = torch.where(col_live[..., None], vals, 0.0)
    q = torch.cat([q_lat, q_rope], dim=-1).float()  # (B, S_q, H, d_c + d_r)
    # (B, S_q, H, D) x (B, S_k, D) -> (B, H, S_q, S_k)
    scores = torch.einsum("bqhd,bkd->bhqk", q, keys) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S_q)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]), nan=0.0)  # rows with no key: 0
    out = torch.einsum("bhqk,bkc->bqhc", probs, vals)
    return out.to(q_lat.dtype), lse.transpose(1, 2).contiguous()
