"""Attention over the cache at Wan-1.3B chunk shapes: MHA flash vs MLA up-projected vs latent kernels.

    python bench/kernels.py [--context-frames 12 21] [--budget 0.25] [--analysis]

Shapes (bf16): 12 heads, a chunk of 3 latent frames = 4,680 query tokens, a cached context of 12 or
21 latent frames x 1,560 tokens; keys = context + the chunk itself. MLA: d_nope = d_v = 128,
d_r = 64, d_c = 160 (d_c + d_r = 224), scale 1/sqrt(192). MHA baseline: head_dim 128.

    (a) torch SDPA, flash backend, on full MHA K/V (the baseline model and its 287.5 MB/frame cache)
    (b) up-project the latent to per-head K/V (written to GPU memory), then torch SDPA
    (c) kernels.latent_attention: absorbed MLA reading c_kv + k_rope from the cache directly
    (d) kernels.sparse_attention at a block budget (default 25% of all key blocks per head)

Prints ms, TFLOP/s, GB/s, bytes read and time ratios against (a), from the formulas below. Without a
CUDA device it prints the FLOP/byte analysis only. Imports only torch, triton, ops and kernels.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

HEADS, S_Q, TOK_PER_FRAME = 12, 4680, 1560
D_NOPE, D_V, D_R, D_C = 128, 128, 64, 160
D_MHA = 128  # head_dim of the MHA baseline
BF16 = 2  # bytes per element
BLOCK, Q_GROUP = 64, 128  # sparse: tokens per context block, queries sharing one selection


# ---- FLOP and byte formulas (per layer, one stream, one chunk) ------------------------------------
def flops_mha(s_k: int) -> float:
    # QK^T and PV, 2 FLOPs per multiply-add: 2 * S_q * S_k * H * (d_qk + d_v)
    return 2.0 * S_Q * s_k * HEADS * (D_MHA + D_MHA)


def bytes_mha(s_k: int) -> float:
    # read q and per-head K, V once; write o
    return BF16 * (S_Q * HEADS * D_MHA + 2 * s_k * HEADS * D_MHA + S_Q * HEADS * D_MHA)


def flops_upproj(s_k: int) -> tuple[float, float]:
    """(up-projection, attention): K_nope = W_UK c_kv and V = W_UV c_kv for every key and head, then
    attention with d_qk = d_nope + d_r = 192 and d_v = 128."""
    proj = 2.0 * s_k * HEADS * D_C * (D_NOPE + D_V)
    return proj, 2.0 * S_Q * s_k * HEADS * ((D_NOPE + D_R) + D_V)


def bytes_upproj(s_k: int) -> float:
    # projection: read c_kv + k_rope, write K (192 wide) and V; attention: read q, K, V, write o
    proj = BF16 * (s_k * (D_C + D_R) + s_k * HEADS * (D_NOPE + D_R + D_V))
    attn = BF16 * (S_Q * HEADS * (D_NOPE + D_R) + s_k * HEADS * (D_NOPE + D_R + D_V) + S_Q * HEADS * D_V)
    return proj + attn


def flops_upproj_per_tile(s_k: int, block_m: int = 128) -> float:
    # the rejected fused form: every (query tile, head) re-projects every key tile it reads
    return flops_upproj(s_k)[1] + (S_Q / block_m) * HEADS * 2.0 * s_k * D_C * (D_NOPE + D_V)


def flops_latent(keys_per_row: float) -> float:
    # absorbed: QK^T over d_c + d_r = 224, PV over d_c = 160, for every (query, head) row
    return 2.0 * S_Q * HEADS * keys_per_row * ((D_C + D_R) + D_C)


def flops_absorb() -> float:
    # q_lat = W_UK^T q_nope and o = W_UV o_lat: per (query, head) 2 * d_nope * d_c each
    return 2 * 2.0 * S_Q * HEADS * D_NOPE * D_C


def bytes_latent(keys_read: float) -> float:
    # read q_lat + q_rope and each latent key row [c_kv | k_rope] once; write o_lat and lse (fp32)
    return BF16 * (S_Q * HEADS * (D_C + D_R) + keys_read * (D_C + D_R) + S_Q * HEADS * D_C) + 4 * S_Q * HEADS


def sparse_budget(s_ctx: int, budget: float) -> int:
    """Selected context blocks per (query group, head) so that selected + chunk = budget of all keys."""
    return max(0, int((budget * (s_ctx + S_Q) - S_Q) // BLOCK))


def analysis(frames: list[int], budget: float) -> list[list]:
    rows = []
    for f in frames:
        s_ctx = f * TOK_PER_FRAME
        s_k = s_ctx + S_Q
        top_k = sparse_budget(s_ctx, budget)
        keys_d = top_k * BLOCK + S_Q
        proj, attn = flops_upproj(s_k)
        rows += [
            [f, "(a) MHA flash", flops_mha(s_k), bytes_mha(s_k)],
            [f, "(b) up-project + SDPA", proj + attn, bytes_upproj(s_k)],
            [f, "    up-projected per tile", flops_upproj_per_tile(s_k), bytes_latent(s_k)],
            [f, "(c) latent (absorbed)", flops_latent(s_k), bytes_latent(s_k)],
            [f, f"(d) sparse top-{top_k}x{BLOCK}", flops_latent(keys_d),
             bytes_latent(min(s_k, HEADS * top_k * BLOCK + S_Q))],
        ]
    return rows


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")


def print_analysis(frames: list[int], budget: float) -> None:
    rows = []
    for f, name, fl, by in analysis(frames, budget):
        base = analysis([f], budget)[0][2]
        rows.append([f, name, f"{fl / 1e12:.3f}", f"{fl / base:.2f}", f"{by / 1e6:.1f}", f"{fl / by:,.0f}"])
    print_table("FLOPs and compulsory bytes per layer (one stream, one chunk)",
                ["ctx frames", "form", "TFLOP", "x (a)", "MB moved", "FLOP/B"], rows)


# ---- GPU measurements -----------------------------------------------------------------------------
def bench_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=200)  # median ms


def measure_context(frames: int, budget: float, check: bool, device: str = "cuda") -> list[list]:
    """Time (a)-(d) at one context length; rows of the result table."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.latent_attention import latent_attention
    from kernels.sparse_attention import sparse_latent_attention
    from ops.latent_attention import latent_attention_varlen_ref
    from ops.sparse_attention import select_blocks

    g = torch.Generator(device=device).manual_seed(frames)
    r = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16, generator=g)  # noqa: E731
    scale = (D_NOPE + D_R) ** -0.5
    s_ctx = frames * TOK_PER_FRAME
    s_k = s_ctx + S_Q

    # (a) MHA: (1, H, S, 128), flash only
    q_m, k_m, v_m = r(1, HEADS, S_Q, D_MHA), r(1, HEADS, s_k, D_MHA), r(1, HEADS, s_k, D_MHA)

    def run_a():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q_m, k_m, v_m)

    # MLA: cache rows [c_kv | k_rope] of the context (k_rope rotated by the caller's pre-pass), the chunk
    rows_ctx = r(s_ctx, D_C + D_R)
    ckv_ctx, kr_ctx = rows_ctx[:, :D_C], rows_ctx[:, D_C:].contiguous()
    ckv_new, kr_new = r(S_Q, D_C), r(S_Q, D_R)
    q_nope, q_rope = r(S_Q, HEADS, D_NOPE), r(S_Q, HEADS, D_R)
    w_uk, w_uv = r(HEADS, D_NOPE, D_C) * D_C**-0.5, r(HEADS, D_V, D_C) * D_C**-0.5

    def run_b():  # per-head K/V of every key written to memory, then SDPA (d_qk 192 != d_v 128: no flash)
        c_all = torch.cat([ckv_ctx, ckv_new])  # (S_k, d_c)
        k_nope = torch.einsum("kc,hnc->hkn", c_all, w_uk)  # (H, S_k, d_nope)
        v = torch.einsum("kc,hvc->hkv", c_all, w_uv)  # (H, S_k, d_v)
        k = torch.cat([k_nope, torch.cat([kr_ctx, kr_new])[None].expand(HEADS, -1, -1)], dim=-1)  # (H, S_k, 192)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(0, 1)  # (H, S_q, 192)
        return torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)

    q_lat = torch.einsum("qhn,hnc->qhc", q_nope, w_uk)[None]  # (1, S_q, H, d_c)
    qr = q_rope[None]
    ctx = (ckv_ctx[None], kr_ctx[None])
    chunk = dict(ckv_new=ckv_new[None], k_rope_new=kr_new[None])

    def run_c():
        return latent_attention(q_lat, qr, *ctx, scale, **chunk)

    def run_c_full():  # with the two absorbed projections around it
        ql = torch.einsum("qhn,hnc->qhc", q_nope, w_uk)[None]
        o_lat, _ = latent_attention(ql, qr, *ctx, scale, **chunk)
        return torch.einsum("qhc,hvc->qhv", o_lat[0], w_uv)

    top_k = sparse_budget(s_ctx, budget)

    def run_select():
        return select_blocks(q_lat, qr, *ctx, top_k=top_k, block_size=BLOCK, q_group=Q_GROUP, head_group=1)

    idx, cnt = run_select()

    def run_d():
        return sparse_latent_attention(q_lat, qr, *ctx, scale, idx, cnt, block_size=BLOCK, q_group=Q_GROUP, **chunk)

    t = {name: bench_ms(fn) for name, fn in
         [("a", run_a), ("b", run_b), ("c", run_c), ("c+", run_c_full), ("d", run_d), ("sel", run_select)]}

    if check:  # correctness at full context on the first 256 queries (the fp32 reference is O(S_q * S_k))
        n = 256
        o_c, _ = latent_attention(q_lat[:, :n], qr[:, :n], *ctx, scale, **chunk)
        f32 = lambda x: x.float()  # noqa: E731
        ref, _ = latent_attention_varlen_ref(f32(q_lat[:, :n]), f32(qr[:, :n]), *map(f32, ctx), scale,
                                             ckv_new=f32(chunk["ckv_new"]), k_rope_new=f32(chunk["k_rope_new"]))
        err = float((o_c.float() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        print(f"check ctx={frames}: latent kernel vs fp32 reference, first {n} queries: rms-rel {err:.2e} (tol 1e-2)")

    proj, attn = flops_upproj(s_k)
    keys_d = top_k * BLOCK + S_Q
    bytes_d = bytes_latent(min(s_k, HEADS * top_k * BLOCK + S_Q))
    out = []
    for name, ms, fl, by in [
        ("(a) SDPA flash, MHA K/V", t["a"], flops_mha(s_k), bytes_mha(s_k)),
        ("(b) up-project + SDPA", t["b"], proj + attn, bytes_upproj(s_k)),
        ("(c) latent kernel", t["c"], flops_latent(s_k), bytes_latent(s_k)),
        ("(c) + W_UK/W_UV absorb", t["c+"], flops_latent(s_k) + flops_absorb(), bytes_latent(s_k)),
        (f"(d) sparse, top-{top_k}x{BLOCK} + chunk", t["d"], flops_latent(keys_d), bytes_d),
        ("(d) + block selection", t["d"] + t["sel"], flops_latent(keys_d), bytes_d),
    ]:
        out.append([frames, name, f"{ms:.3f}", f"{fl / ms / 1e9:.0f}", f"{by / ms / 1e6:.0f}", f"{by / 1e6:.1f}",
                    f"{t['a'] / ms:.2f}x", f"{t['b'] / ms:.2f}x"])
    return out


def measure(frames: list[int], budget: float, check: bool) -> None:
    import triton

    rows = [row for f in frames for row in measure_context(f, budget, check)]
    print_table(f"{torch.cuda.get_device_name()} | {datetime.date.today()} | torch {torch.__version__} | "
                f"triton {triton.__version__} | sparse budget {budget:.0%}",
                ["ctx frames", "form", "ms", "TFLOP/s", "GB/s", "MB read", "speed vs (a)", "speed vs (b)"], rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context-frames", type=int, nargs="+", default=[12, 21])
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of all key blocks each head reads in (d)")
    ap.add_argument("--analysis", action="store_true", help="print the FLOP/byte analysis only")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    args = ap.parse_args()
    print_analysis(args.context_frames, args.budget)
    if args.analysis:
        return 0
    if not torch.cuda.is_available():
        print("\nno CUDA device: GPU figures not measured")
        return 0
    measure(args.context_frames, args.budget, not args.no_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
