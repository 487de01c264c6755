"""Block-sparse latent attention kernel and top-k block selection, against their fp32 references.

Block tables are random, non-contiguous and different per head group; every entry past a group's
count holds 2**31 - 1, and unused cache slots hold NaN, so an out-of-bounds or unmasked read fails.
"""

import pytest
import torch

from kernels.sparse_attention import sparse_latent_attention
from ops.latent_attention import latent_attention_varlen_ref
from ops.sparse_attention import SENTINEL, select_blocks, sparse_latent_attention_ref
from tests.kernels.util import DEVICE, as_fp32, assert_matches_reference, latent_inputs

SCALE = 192**-0.5


def random_table(batch, h_g, n_qg, top_k, n_blocks, seed, empty_every=0):
    """Distinct random blocks per (batch, head group, query group), random counts, SENTINEL after."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((batch, h_g, n_qg, top_k), SENTINEL, dtype=torch.int32)
    cnt = torch.randint(0, min(top_k, n_blocks) + 1, (batch, h_g, n_qg), generator=g, dtype=torch.int32)
    for b in range(batch):
        for h in range(h_g):
            for q in range(n_qg):
                if empty_every and (h + q) % empty_every == 0:
                    cnt[b, h, q] = 0
                n = int(cnt[b, h, q])
                idx[b, h, q, :n] = torch.randperm(n_blocks, generator=g)[:n].to(torch.int32)
    return idx.to(DEVICE), cnt.to(DEVICE)


# name: batch, S_q, H, heads per group, q_group, d_c, d_r, S_ctx, S_new, top_k, block, window, holes, k_len
CASES = {
    "len1-1h-empty-memory": (1, 1, 1, 1, 1, 160, 64, 0, 1, 2, 16, None, 0.0, None),
    "63q-3h-per-head": (2, 63, 3, 1, 16, 160, 64, 300, 63, 4, 32, [250, 280], 0.2, [260, 300]),
    "500q-12h-groups-of-4": (1, 500, 12, 4, 128, 32, 16, 200, 7, 3, 64, [150], 0.1, None),
    "12h-one-group-odd-qgroup": (1, 40, 12, 12, 7, 160, 64, 130, None, 5, 16, None, 0.3, [117]),
    "3h-window-only": (1, 20, 3, 3, 20, 24, 8, 90, 4, 0, 16, [30], 0.0, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    batch, s_q, heads, group, q_group, d_c, d_r, s_ctx, s_new, top_k, bs, win, holes, lens = CASES[case]
    args, kw = latent_inputs(batch, s_q, heads, d_c, d_r, s_ctx, s_new, dtype, seed=s_q, holes=holes, lens=lens)
    n_qg, n_blocks = -(-s_q // q_group), -(-s_ctx // bs)
    idx, cnt = random_table(batch, heads // group, n_qg, top_k, n_blocks, seed=s_ctx, empty_every=3)
    if win is not None:
        kw["window_start"] = torch.tensor(win, device=DEVICE)
    out, lse = sparse_latent_attention(*args, SCALE, idx, cnt, block_size=bs, q_group=q_group, **kw, block_m=32)
    ref_args, ref_kw = as_fp32(args, kw)
    ref = sparse_latent_attention_ref(*ref_args, SCALE, idx, cnt, block_size=bs, q_group=q_group, **ref_kw)
    assert_matches_reference(case, out, lse, *ref, dtype)


def test_every_block_selected_equals_dense_attention():
    args, kw = latent_inputs(2, 33, 3, 160, 64, 150, 11, torch.float32, holes=0.2, lens=[150, 101])
    n_blocks = -(-150 // 32)
    idx = torch.arange(n_blocks, dtype=torch.int32).flip(0).expand(2, 3, 3, n_blocks).contiguous()  # any order
    cnt = torch.full((2, 3, 3), n_blocks, dtype=torch.int32)
    dense = latent_attention_varlen_ref(*args, SCALE, **kw)
    sparse_ref = sparse_latent_attention_ref(*args, SCALE, idx, cnt, block_size=32, q_group=11, **kw)
    assert_matches_reference("sparse ref, all blocks, vs dense ref", *sparse_ref, *dense, torch.float32)
    kw["window_start"] = torch.tensor([120, 40])  # the window overlaps selected blocks: counted once
    out = sparse_latent_attention(*args, SCALE, idx.to(DEVICE), cnt.to(DEVICE), block_size=32, q_group=11, **kw)
    assert_matches_reference("sparse kernel, all blocks + window, vs dense ref", *out, *dense, torch.float32)


def test_default_launch_matches_reference():
    args, kw = latent_inputs(1, 70, 12, 160, 64, 256, 9, torch.bfloat16, holes=0.1)
    idx, cnt = random_table(1, 12, 1, 2, 4, seed=1)
    out = sparse_latent_attention(*args, SCALE, idx, cnt, block_size=64, q_group=70, **kw)
    ref_args, ref_kw = as_fp32(args, kw)
    assert_matches_reference(
        "default launch",
        *out,
        *sparse_latent_attention_ref(*ref_args, SCALE, idx, cnt, block_size=64, q_group=70, **ref_kw),
        torch.bfloat16,
    )


def test_nothing_attended_gives_zero_and_minus_inf():
    args, kw = latent_inputs(1, 6, 2, 160, 64, 64, None, torch.float32, holes=1.0)
    idx, cnt = random_table(1, 2, 2, 2, 4, seed=0)  # selections of fully masked slots only
    out, lse = sparse_latent_attention(*args, SCALE, idx, cnt, block_size=16, q_group=3, **kw)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_bad_tables_raise_value_error():
    args, kw = latent_inputs(1, 8, 4, 32, 16, 64, None, torch.float32)
    good = dict(block_size=16, q_group=4)
    idx, cnt = torch.zeros(1, 2, 2, 3, dtype=torch.int32), torch.zeros(1, 2, 2, dtype=torch.int32)
    for bad_idx, bad_cnt, extra in [
        (idx.long(), cnt, {}),  # int64 table
        (idx[:, :, :1], cnt[:, :, :1], {}),  # wrong number of query groups
        # 3 head groups do not divide 4 heads
        (torch.zeros(1, 3, 2, 3, dtype=torch.int32), torch.zeros(1, 3, 2, dtype=torch.int32), {}),
        (idx, cnt[..., :1], {}),  # count shape
        (idx, cnt, {"block_size": 24}),
        (idx, cnt, {"q_group": 0}),
        (idx, cnt, {"window_start": torch.zeros(2, dtype=torch.int32)}),
    ]:
        with pytest.raises(ValueError):
            sparse_latent_attention(*args, SCALE, bad_idx, bad_cnt, **{**good, **extra}, **kw)


# ---- block selection -------------------------------------------------------------------------------


def planted(s_ctx=256, block=16, heads=2, s_q=8, targets=(3, 9), d_c=32, d_r=16, seed=0):
    """Queries aligned with one direction; the keys of the target blocks point the same way."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d_c + d_r, generator=g)
    u /= u.norm()
    q = 4 * u + 0.1 * torch.randn(1, s_q, heads, d_c + d_r, generator=g)
    keys = 0.1 * torch.randn(1, s_ctx, d_c + d_r, generator=g)
    for t in targets:
        keys[0, t * block : (t + 1) * block] += 3 * u
    return q[..., :d_c], q[..., d_c:], keys[..., :d_c], keys[..., d_c:]


@pytest.mark.parametrize("summary", ["mean", "minmax"])
def test_selection_finds_planted_blocks(summary):
    q, qr, c, r = planted()
    idx, cnt = select_blocks(q, qr, c, r, top_k=2, block_size=16, q_group=8, summary=summary)
    print(summary, idx.tolist(), cnt.tolist())
    assert idx.shape == (1, 2, 1, 2) and (cnt == 2).all()
    assert (idx == torch.tensor([3, 9], dtype=torch.int32)).all()


def test_selection_masks_nan_slots_and_pads_with_sentinel():
    q, qr, c, r = planted(targets=(3,))
    valid = torch.ones(1, 256, dtype=torch.bool)
    valid[0, 16 * 5 : 16 * 7] = False  # blocks 5, 6 empty
    c[~valid], r[~valid] = float("nan"), float("nan")
    k_len = torch.tensor([16 * 8])  # only blocks 0..7 exist
    idx, cnt = select_blocks(q, qr, c, r, top_k=10, block_size=16, q_group=8, k_len=k_len, k_valid=valid)
    print(idx.tolist(), cnt.tolist())
    assert (cnt == 6).all()  # blocks 0-4 and 7
    assert idx[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 7] + [SENTINEL] * 4


def test_adaptive_window_exclusion():
    # blocks of 16; always-on window from token 192 (block 12); local region = blocks 8..11
    q, qr, c, r = planted(targets=(9, 10))  # the best-scoring blocks are local ones
    win, local = torch.tensor([192]), torch.tensor([128])
    # long history: 8 long-range blocks >= top_k = 3 -> local blocks leave the candidates
    idx, cnt = select_blocks(q, qr, c, r, top_k=3, block_size=16, q_group=8, window_start=win, local_start=local)
    print("long history", idx[0, :, 0].tolist())
    assert (cnt == 3).all() and (idx < 8).all()
    # short history: only blocks 0, 1 are long-range (< top_k) -> local blocks stay candidates
    valid = torch.ones(1, 256, dtype=torch.bool)
    valid[0, 32:128] = False
    idx, cnt = select_blocks(
        q, qr, c, r, top_k=3, block_size=16, q_group=8, window_start=win, local_start=local, k_valid=valid
    )
    print("short history", idx[0, :, 0].tolist())
    assert (cnt == 3).all() and set(idx[0, 0, 0].tolist()) >= {9, 10}
    # blocks inside the always-on window are never selected
    idx, cnt = select_blocks(q, qr, c, r, top_k=16, block_size=16, q_group=8, window_start=win)
    assert (cnt == 12).all() and idx[..., :12].max() < 12


def test_sink_blocks_always_selected_and_groups_follow_their_queries():
    q, qr, c, r = planted(targets=(9,), heads=4, s_q=8)
    q[0, 4:], qr[0, 4:] = -q[0, 4:], -qr[0, 4:]  # the second query group points away from block 9
    idx, cnt = select_blocks(q, qr, c, r, top_k=2, block_size=16, q_group=4, head_group=2, sink_len=16)
    print(idx.tolist())
    assert idx.shape == (1, 2, 2, 2) and (cnt == 2).all()
    assert (idx[..., 0] == 0).all()  # the sink block, forced
    assert (idx[:, :, 0, 1] == 9).all() and (idx[:, :, 1, 1] != 9).all()
    # a sink of 20 tokens covers blocks 0 and 1: both forced, the whole budget
    idx, _ = select_blocks(q, qr, c, r, top_k=2, block_size=16, q_group=4, head_group=2, sink_len=20)
    assert (idx == torch.tensor([0, 1], dtype=torch.int32)).all()


def test_selection_then_kernel_end_to_end():
    args, kw = latent_inputs(1, 45, 6, 160, 64, 320, 15, torch.bfloat16, holes=0.1, seed=5)
    kw["window_start"] = torch.tensor([256], device=DEVICE)
    idx, cnt = select_blocks(
        *args,
        top_k=3,
        block_size=32,
        q_group=15,
        head_group=3,
        k_valid=kw["k_valid"],
        window_start=kw["window_start"],
        sink_len=32,
    )
    out = sparse_latent_attention(*args, SCALE, idx, cnt, block_size=32, q_group=15, **kw)
    ref_args, ref_kw = as_fp32(args, kw)
    assert_matches_reference(
        "select + kernel",
        *out,
        *sparse_latent_attention_ref(*ref_args, SCALE, idx, cnt, block_size=32, q_group=15, **ref_kw),
        torch.bfloat16,
    )
