"""Fused STAR module in Triton: score, causal pooling, gate, refiner and mix in one kernel.

Implements, per decoder position t of a [B, T, d] block (SPEC section 1, kernels/reference.py):

    u_t  = tanh(W_a h_t + b_a);  s_t = q . u_t                                 score
    m_t  = max_{i<=t, mask_i} s_i;  l_t = sum_{i<=t, mask_i} e^{s_i - m_t}     online softmax
    z_t  = sum_{i<=t, mask_i} e^{s_i - m_t} h_i / l_t      (z_t = 0 where l_t = 0)
    g_t  = sigmoid(W_g2 relu(W_g1 z_t + b_g1) + b_g2)                         gate [d] or [1]
    hhat = W_p2 relu(W_p1 z_t + b_p1) + b_p2                                  refiner
    h'_t = h_t + g_t (hhat_t - h_t)                       (= g hhat + (1 - g) h)

One program owns SPB = BLOCK_M // T whole sequences (BLOCK_M >= T rows, so T <= MAX_T): the
pooling needs every earlier row of a sequence, and owning the sequence keeps it in one program
with no carry between programs. The program runs four stages over its rows; each stage loops over
64-wide column tiles and K tiles with tl.dot, and hands its result to the next stage through a
row-block of global memory (z, relu(W_g1 z), relu(W_p1 z)) that stays in L2 and that the
backward needs anyway. The [BLOCK_M, BLOCK_M] causal weight matrix e^{s_i - m_t} is built in
registers from the scores, so the pooling is one more tl.dot per column tile.

The decode step is the same kernel with T = 1 and the streaming state (m, l, a) of each
sequence as the carry: the carried sum enters with weight e^{m - m'} exactly as in
StarModule.step, and the kernel writes the new state.

Backward (_star_bwd_kernel): the same row layout, recomputing the softmax weights from the saved
s, m, l. It produces dL/dh and the gradients of the five pre-activations; the weight and bias
gradients are then reductions over all B*T rows (dW = dA^T X), which cuBLAS does with the full
chip, so they are torch.mm / sum calls on the saved tensors.

Matmul precision follows PyTorch's: float32 inputs use IEEE float32 products unless
torch.get_float32_matmul_precision() is "high"/"medium" (then TF32, as cuBLAS would); float16 and
bfloat16 inputs multiply in their own type with float32 accumulation.

Measured on an H200 (docs/kernel.md): at B=128, T=41, d=512 the fused fwd+bwd is 1.4x faster
than eager in bfloat16 and 1.7x in TF32 wall-clock, 19x and 9x the floor; one program's serial
chain of 64x64x64 dots (~0.17 ms) sets the time at every batch size. In float32 with TF32 off
it is 2.4x slower than eager, so StarModule(backend="auto") runs the reference there.

Layout after Liger-Kernel's ops (one file: jit kernels, host functions, autograd.Function).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .reference import EMPTY_MAX, StarState

# A program holds a [BLOCK_M, BLOCK_M] float32 weight tile; 128 x 128 over 8 warps is 64
# registers a thread. Longer sequences go to the reference (training uses T <= 41).
MAX_T = 128
# Smallest row block: tensor-core tiles want M >= 64 (wgmma is 64 rows per warpgroup); 128 was
# slower at every shape measured, 16 faster for decode steps at B <= 16 (docs/kernel.md).
MIN_BLOCK_M = 64
BLOCK_D = 64  # column and K tile of every matmul
_EMPTY = tl.constexpr(EMPTY_MAX)  # jit code reads globals only as constexpr
_NEG_INF = tl.constexpr(float("-inf"))
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class StarWeights(NamedTuple):
    """A StarModule's tensors in kernel order (nn.Linear layout: weight [out, in])."""

    w_a: torch.Tensor  # [d, d]
    b_a: torch.Tensor  # [d]
    q: torch.Tensor  # [d]
    w_g1: torch.Tensor  # [gh, d]
    b_g1: torch.Tensor  # [gh]
    w_g2: torch.Tensor  # [d, gh] (vector gate) or [1, gh] (scalar gate)
    b_g2: torch.Tensor  # [d] or [1]
    w_p1: torch.Tensor  # [rh, d]
    b_p1: torch.Tensor  # [rh]
    w_p2: torch.Tensor  # [d, rh]
    b_p2: torch.Tensor  # [d]


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tl has no tanh on every backend the interpreter and Triton 3.x share; exact identity.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _mm_tile(
    x_ptr,  # [M, K] row-major
    rows,  # [BLOCK_M] int64 row indices
    row_ok,  # [BLOCK_M] bool
    K,
    w_ptr,  # element (n, k) at n * stride_wn + k * stride_wk
    n,  # [BLOCK_D] output columns
    n_ok,  # [BLOCK_D] bool
    stride_wn,
    stride_wk,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """acc[BLOCK_M, BLOCK_D] = X[rows, :K] @ W[n, :K]^T in float32."""
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    offs = tl.arange(0, BLOCK_D)
    for k0 in range(0, K, BLOCK_D):
        k = k0 + offs
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ptrs = w_ptr + k[:, None] * stride_wk + n[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    return acc


@triton.jit
def _rows(pid, B, T, SPB, BLOCK_M: tl.constexpr):
    """The rows of program pid: sequences pid*SPB .. pid*SPB+SPB-1, row = seq * T + t."""
    j = tl.arange(0, BLOCK_M)
    seq = pid * SPB + j // T
    valid = (j < SPB * T) & (seq < B)
    rows = pid * SPB * T + j
    return j, seq, valid, rows


@triton.jit
def _allowed(mask_ptr, j, seq, valid, rows, HAS_MASK: tl.constexpr):
    """[BLOCK_M(query t), BLOCK_M(key i)]: same sequence, i <= t, key i a real token."""
    key_ok = valid
    if HAS_MASK:
        key_ok = key_ok & (tl.load(mask_ptr + rows, mask=valid, other=0) != 0)
    return (seq[:, None] == seq[None, :]) & (j[None, :] <= j[:, None]) & key_ok[None, :] & valid[:, None]


# B, T and SPB vary per call (batch sizes, step vs block) and gain nothing from specialisation
# (Triton would compile again for every value that is 1 or a multiple of 16).
@triton.jit(do_not_specialize=["B", "T", "SPB"])
def _star_fwd_kernel(
    h_ptr,  # [M, D] decoder states, M = B * T rows
    mask_ptr,  # [M] int8, nonzero = real token (HAS_MASK)
    wa_ptr,  # [D, D]
    ba_ptr,  # [D]
    q_ptr,  # [D]
    wg1_ptr,  # [GH, D]
    bg1_ptr,  # [GH]
    wg2_ptr,  # [GO, GH], GO = D (vector gate) or 1 (SCALAR_GATE)
    bg2_ptr,  # [GO]
    wp1_ptr,  # [RH, D]
    bp1_ptr,  # [RH]
    wp2_ptr,  # [D, RH]
    bp2_ptr,  # [D]
    m0_ptr,  # [B] running max before the block (HAS_STATE)
    l0_ptr,  # [B] normaliser before the block (HAS_STATE)
    a0_ptr,  # [B, D] weighted sum before the block (HAS_STATE)
    out_ptr,  # [M, D] h'
    z_ptr,  # [M, D] pooled state (stage 2 -> 3; saved for backward)
    g1_ptr,  # [M, GH] relu(W_g1 z + b_g1) (stage 3 -> 4; saved)
    p1_ptr,  # [M, RH] relu(W_p1 z + b_p1) (stage 3 -> 4; saved)
    u_ptr,  # [M, D] tanh(W_a h + b_a) (SAVE)
    g_ptr,  # [M, GO] gate (SAVE)
    hhat_ptr,  # [M, D] refined state (SAVE)
    s_ptr,  # [M] float32 score (SAVE)
    m_ptr,  # [M] float32 running max at each row
    l_ptr,  # [M] float32 normaliser at each row
    a_out_ptr,  # [B, D] weighted sum after each sequence's last row (STATE_OUT)
    B,
    T,
    D,
    GH,
    RH,
    SPB,  # sequences per program
    HAS_MASK: tl.constexpr,
    HAS_STATE: tl.constexpr,
    STATE_OUT: tl.constexpr,
    SAVE: tl.constexpr,
    SCALAR_GATE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    j, seq, valid, rows = _rows(pid, B, T, SPB, BLOCK_M)
    offs = tl.arange(0, BLOCK_D)
    dtype = h_ptr.dtype.element_ty

    # 1. score s = q . tanh(W_a h + b_a)                                            [BLOCK_M]
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_D):
        n = n0 + offs
        n_ok = n < D
        acc = _mm_tile(h_ptr, rows, valid, D, wa_ptr, n, n_ok, D, 1, PREC, BLOCK_M, BLOCK_D)
        u = _tanh(acc + tl.load(ba_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :])
        s += tl.sum(u * tl.load(q_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :], axis=1)
        if SAVE:
            tl.store(u_ptr + rows[:, None] * D + n[None, :], u.to(dtype), mask=valid[:, None] & n_ok[None, :])

    # 2. causal pooling with the online-softmax carry                              [BLOCK_M, D]
    allowed = _allowed(mask_ptr, j, seq, valid, rows, HAS_MASK)  # [BLOCK_M, BLOCK_M]
    m = tl.maximum(tl.max(tl.where(allowed, s[None, :], _NEG_INF), axis=1), _EMPTY)
    if HAS_STATE:
        m0 = tl.load(m0_ptr + seq, mask=valid, other=_EMPTY).to(tl.float32)
        m = tl.maximum(m, m0)
        carry = tl.exp(m0 - m)  # weight of the carried state, e^{m - m'}
        l = tl.load(l0_ptr + seq, mask=valid, other=0.0).to(tl.float32) * carry
    else:
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w = tl.exp(tl.where(allowed, s[None, :] - m[:, None], _NEG_INF))  # e^{s_i - m_t}
    l += tl.sum(w, axis=1)
    inv_l = tl.where(l > 0, 1.0 / tl.where(l > 0, l, 1.0), 0.0)  # no valid position: z = 0
    tl.store(m_ptr + rows, m, mask=valid)
    tl.store(l_ptr + rows, l, mask=valid)
    if SAVE:
        tl.store(s_ptr + rows, s, mask=valid)
    last = valid & ((j % T) == T - 1)
    w = w.to(dtype)
    for n0 in range(0, D, BLOCK_D):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        hk = tl.load(h_ptr + rows[:, None] * D + n[None, :], mask=tile_ok, other=0.0)
        a = tl.dot(w, hk, input_precision=PREC)  # [BLOCK_M, BLOCK_D]
        if HAS_STATE:
            a0 = tl.load(a0_ptr + seq[:, None] * D + n[None, :], mask=tile_ok, other=0.0)
            a += carry[:, None] * a0.to(tl.float32)
        tl.store(z_ptr + rows[:, None] * D + n[None, :], (a * inv_l[:, None]).to(dtype), mask=tile_ok)
        if STATE_OUT:
            a_ptrs = a_out_ptr + seq[:, None] * D + n[None, :]
            tl.store(a_ptrs, a.to(a_out_ptr.dtype.element_ty), mask=last[:, None] & n_ok[None, :])
    tl.debug_barrier()  # z is read back below by other threads of this program

    # 3. first layers of both FFNs                                     [BLOCK_M, GH], [BLOCK_M, RH]
    for n0 in range(0, GH, BLOCK_D):
        n = n0 + offs
        n_ok = n < GH
        acc = _mm_tile(z_ptr, rows, valid, D, wg1_ptr, n, n_ok, D, 1, PREC, BLOCK_M, BLOCK_D)
        acc = tl.maximum(acc + tl.load(bg1_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :], 0.0)
        tl.store(g1_ptr + rows[:, None] * GH + n[None, :], acc.to(dtype), mask=valid[:, None] & n_ok[None, :])
    for n0 in range(0, RH, BLOCK_D):
        n = n0 + offs
        n_ok = n < RH
        acc = _mm_tile(z_ptr, rows, valid, D, wp1_ptr, n, n_ok, D, 1, PREC, BLOCK_M, BLOCK_D)
        acc = tl.maximum(acc + tl.load(bp1_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :], 0.0)
        tl.store(p1_ptr + rows[:, None] * RH + n[None, :], acc.to(dtype), mask=valid[:, None] & n_ok[None, :])
    tl.debug_barrier()

    # 4. second layers, gate and mix                                                [BLOCK_M, D]
    if SCALAR_GATE:
        ga = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, GH, BLOCK_D):
            k = k0 + offs
            k_ok = k < GH
            g1 = tl.load(g1_ptr + rows[:, None] * GH + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            ga += tl.sum(g1.to(tl.float32) * tl.load(wg2_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :], axis=1)
        gs = tl.sigmoid(ga + tl.load(bg2_ptr).to(tl.float32))
        if SAVE:
            tl.store(g_ptr + rows, gs.to(dtype), mask=valid)
    for n0 in range(0, D, BLOCK_D):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        hhat = _mm_tile(p1_ptr, rows, valid, RH, wp2_ptr, n, n_ok, RH, 1, PREC, BLOCK_M, BLOCK_D)
        hhat += tl.load(bp2_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SCALAR_GATE:
            g = gs[:, None]
        else:
            g = _mm_tile(g1_ptr, rows, valid, GH, wg2_ptr, n, n_ok, GH, 1, PREC, BLOCK_M, BLOCK_D)
            g = tl.sigmoid(g + tl.load(bg2_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :])
            if SAVE:
                tl.store(g_ptr + rows[:, None] * D + n[None, :], g.to(dtype), mask=tile_ok)
        hk = tl.load(h_ptr + rows[:, None] * D + n[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * D + n[None, :], (hk + g * (hhat - hk)).to(dtype), mask=tile_ok)
        if SAVE:
            tl.store(hhat_ptr + rows[:, None] * D + n[None, :], hhat.to(dtype), mask=tile_ok)


@triton.jit(do_not_specialize=["B", "T", "SPB"])
def _star_bwd_kernel(
    dy_ptr,  # [M, D] dL/dh'
    h_ptr,  # [M, D]
    mask_ptr,  # [M] int8 (HAS_MASK)
    wa_ptr,  # [D, D]
    q_ptr,  # [D]
    wg1_ptr,  # [GH, D]
    wg2_ptr,  # [GO, GH]
    wp1_ptr,  # [RH, D]
    wp2_ptr,  # [D, RH]
    z_ptr,  # [M, D]   saved by the forward
    g1_ptr,  # [M, GH] saved
    p1_ptr,  # [M, RH] saved
    u_ptr,  # [M, D]   saved
    g_ptr,  # [M, GO]  saved
    hhat_ptr,  # [M, D] saved
    s_ptr,  # [M] float32 saved
    m_ptr,  # [M] float32 saved
    l_ptr,  # [M] float32 saved
    dh_ptr,  # [M, D] dL/dh (output)
    dhhat_ptr,  # [M, D] dL/dhhat = dy g (output, for dW_p2)
    dga_ptr,  # [M, GO] dL/d(W_g2 . + b_g2) (output, for dW_g2)
    dg1_ptr,  # [M, GH] dL/d(W_g1 z + b_g1) (output, for dW_g1)
    dp1_ptr,  # [M, RH] dL/d(W_p1 z + b_p1) (output, for dW_p1)
    dz_ptr,  # [M, D] float32 dL/dz (scratch)
    ds_ptr,  # [M] float32 dL/ds (output, for dq)
    dpa_ptr,  # [M, D] dL/d(W_a h + b_a) (output, for dW_a)
    B,
    T,
    D,
    GH,
    RH,
    SPB,
    HAS_MASK: tl.constexpr,
    SCALAR_GATE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    j, seq, valid, rows = _rows(pid, B, T, SPB, BLOCK_M)
    offs = tl.arange(0, BLOCK_D)
    dtype = h_ptr.dtype.element_ty

    # 1. mix and gate: h' = h + g (hhat - h)
    if SCALAR_GATE:
        gs = tl.load(g_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        dgs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_D):
        n = n0 + offs
        tile_ok = valid[:, None] & (n < D)[None, :]
        ptrs = rows[:, None] * D + n[None, :]
        dy = tl.load(dy_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        dg = dy * (tl.load(hhat_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
                   - tl.load(h_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32))  # dL/dg
        if SCALAR_GATE:
            g = gs[:, None]
            dgs += tl.sum(dg, axis=1)
        else:
            g = tl.load(g_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
            tl.store(dga_ptr + ptrs, (dg * g * (1.0 - g)).to(dtype), mask=tile_ok)
        tl.store(dhhat_ptr + ptrs, (dy * g).to(dtype), mask=tile_ok)
    if SCALAR_GATE:
        tl.store(dga_ptr + rows, (dgs * gs * (1.0 - gs)).to(dtype), mask=valid)
    tl.debug_barrier()

    # 2. back through the second layers and the relus                 [BLOCK_M, GH], [BLOCK_M, RH]
    if SCALAR_GATE:
        dga = tl.load(dga_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    for n0 in range(0, GH, BLOCK_D):
        n = n0 + offs
        n_ok = n < GH
        tile_ok = valid[:, None] & n_ok[None, :]
        if SCALAR_GATE:
            acc = dga[:, None] * tl.load(wg2_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:
            acc = _mm_tile(dga_ptr, rows, valid, D, wg2_ptr, n, n_ok, 1, GH, PREC, BLOCK_M, BLOCK_D)
        g1 = tl.load(g1_ptr + rows[:, None] * GH + n[None, :], mask=tile_ok, other=0.0)
        tl.store(dg1_ptr + rows[:, None] * GH + n[None, :], tl.where(g1 > 0, acc, 0.0).to(dtype), mask=tile_ok)
    for n0 in range(0, RH, BLOCK_D):
        n = n0 + offs
        n_ok = n < RH
        tile_ok = valid[:, None] & n_ok[None, :]
        acc = _mm_tile(dhhat_ptr, rows, valid, D, wp2_ptr, n, n_ok, 1, RH, PREC, BLOCK_M, BLOCK_D)
        p1 = tl.load(p1_ptr + rows[:, None] * RH + n[None, :], mask=tile_ok, other=0.0)
        tl.store(dp1_ptr + rows[:, None] * RH + n[None, :], tl.where(p1 > 0, acc, 0.0).to(dtype), mask=tile_ok)
    tl.debug_barrier()

    # 3. dL/dz                                                                        [BLOCK_M, D]
    for n0 in range(0, D, BLOCK_D):
        n = n0 + offs
        n_ok = n < D
        dz = _mm_tile(dg1_ptr, rows, valid, GH, wg1_ptr, n, n_ok, 1, D, PREC, BLOCK_M, BLOCK_D)
        dz += _mm_tile(dp1_ptr, rows, valid, RH, wp1_ptr, n, n_ok, 1, D, PREC, BLOCK_M, BLOCK_D)
        tl.store(dz_ptr + rows[:, None] * D + n[None, :], dz, mask=valid[:, None] & n_ok[None, :])
    tl.debug_barrier()

    # 4. pooling, with p[t, i] = e^{s_i - m_t} / l_t and e[t, i] = dz_t . h_i:
    #    dh_i += sum_t p[t,i] dz_t (parked in dh);  ds_i = sum_t p[t,i] (e[t,i] - sum_j p[t,j] e[t,j]).
    #    The softmax form keeps sum_i ds_i = 0 to rounding; h_i.(sum_t p dz_t) - sum_t p[t,i] dz_t.z_t
    #    (z as stored) lost that, and a 2-token sequence's score gradients were 1e-4 off in float32.
    allowed = _allowed(mask_ptr, j, seq, valid, rows, HAS_MASK)
    s = tl.load(s_ptr + rows, mask=valid, other=0.0)
    m = tl.load(m_ptr + rows, mask=valid, other=0.0)
    l = tl.load(l_ptr + rows, mask=valid, other=1.0)
    p = tl.exp(tl.where(allowed, s[None, :] - m[:, None], _NEG_INF)) / tl.where(l > 0, l, 1.0)[:, None]
    pt = tl.trans(p)  # [BLOCK_M(key i), BLOCK_M(query t)]
    e = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_D):
        n = n0 + offs
        tile_ok = valid[:, None] & (n < D)[None, :]
        ptrs = rows[:, None] * D + n[None, :]
        dz = tl.load(dz_ptr + ptrs, mask=tile_ok, other=0.0)
        hk = tl.load(h_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        e = tl.dot(dz, tl.trans(hk), e, input_precision=PREC)
        tl.store(dh_ptr + ptrs, tl.dot(pt, dz, input_precision=PREC).to(dtype), mask=tile_ok)
    ds = tl.sum(p * (e - tl.sum(p * e, axis=1)[:, None]), axis=0)
    tl.store(ds_ptr + rows, ds, mask=valid)

    # 5. score: dL/d(W_a h + b_a) = ds q (1 - u^2)
    for n0 in range(0, D, BLOCK_D):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        u = tl.load(u_ptr + rows[:, None] * D + n[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        qn = tl.load(q_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(dpa_ptr + rows[:, None] * D + n[None, :], (ds[:, None] * qn[None, :] * (1.0 - u * u)).to(dtype),
                 mask=tile_ok)
    tl.debug_barrier()

    # 6. dL/dh = dy (1 - g) + pooling path + score path
    for n0 in range(0, D, BLOCK_D):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        ptrs = rows[:, None] * D + n[None, :]
        acc = _mm_tile(dpa_ptr, rows, valid, D, wa_ptr, n, n_ok, 1, D, PREC, BLOCK_M, BLOCK_D)
        acc += tl.load(dh_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        if SCALAR_GATE:
            g = gs[:, None]
        else:
            g = tl.load(g_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        acc += tl.load(dy_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32) * (1.0 - g)
        tl.store(dh_ptr + ptrs, acc.to(dtype), mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------

# True when TRITON_INTERPRET was set as this module was imported: the kernels then run on CPU
# tensors through Triton's numpy interpreter (the tests), else they need CUDA tensors.
INTERPRETED = type(_star_fwd_kernel).__name__ == "InterpretedFunction"


def _new(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write comes from here (tests swap in a NaN-filled allocator to
    prove that each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def unsupported(h: torch.Tensor, weights: StarWeights | None = None) -> str | None:
    """Why the fused kernel cannot run on h [B, T, d] (or [B, d] for a step), else None."""
    if h.dtype not in SUPPORTED_DTYPES:
        return f"dtype {h.dtype} (supported: float32, float16, bfloat16)"
    if h.dim() == 3 and h.shape[1] > MAX_T:
        return f"sequence length {h.shape[1]} > {MAX_T}"
    if not h.is_cuda and not INTERPRETED:
        return "tensor on the CPU and TRITON_INTERPRET is not set"
    if INTERPRETED and h.dtype == torch.bfloat16:
        return "bfloat16 under TRITON_INTERPRET (its numpy tl.dot multiplies the raw uint16 bits)"
    return None


def slower_than_reference(h: torch.Tensor) -> str | None:
    """Why backend="auto" should run the reference although the kernel could run, else None.

    float32 with TF32 off ("highest", PyTorch's default) leaves tl.dot on FMA units: on an H200
    the fused fwd+bwd took 4.44 ms against eager's 1.82 ms at B=128, T=41, d=512 (docs/kernel.md).
    """
    if h.dtype == torch.float32 and _precision(h.dtype) == "ieee":
        return "float32 with TF32 off: the kernel's FMA dots are slower than cuBLAS"
    return None


def _precision(dtype: torch.dtype) -> str:
    """Triton dot precision for float32 products, matching what cuBLAS does under PyTorch's
    setting; float16/bfloat16 operands ignore it except in the float32 softmax-backward dots."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch(T: int, block_m: int | None) -> tuple[int, int, dict]:
    """(BLOCK_M, sequences per program, launch options): the row block holds whole sequences."""
    if T > MAX_T:
        raise ValueError(f"the fused STAR kernel handles T <= {MAX_T}, got {T}")
    bm = block_m or max(MIN_BLOCK_M, triton.next_power_of_2(T))
    if bm < T or bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two >= max(16, T={T}), got {bm}")
    # ptxas for sm_90 (Triton 3.9): 64 rows on 8 warps compile with no register spills (4 warps
    # spilled), and 128 rows need 2 pipeline stages to keep the backward's shared memory at
    # 196 KB of the 227 KB a block may have (229 KB with 3 stages).
    return bm, bm // T, dict(num_warps=4 if bm <= 32 else 8, num_stages=3 if bm <= 64 else 2)


def _prepare(weights: StarWeights, dtype: torch.dtype) -> StarWeights:
    return StarWeights(*(w.detach().to(dtype).contiguous() for w in weights))


def star_forward(
    h: torch.Tensor,
    weights: StarWeights,
    mask: torch.Tensor | None = None,
    state: StarState | None = None,
    *,
    save: bool = False,
    return_state: bool = False,
    block_m: int | None = None,
) -> tuple[torch.Tensor, StarState | None, tuple[torch.Tensor, ...] | None]:
    """Fused STAR forward over a block.

    h: [B, T, d]; mask: [B, T] (nonzero = real token) or None; state: the streaming state before
    the block (StarState with m [B], l [B], a [B, d]) or None for the empty state.
    Returns (h' [B, T, d], the state after the block if return_state, the tensors the backward
    needs if save).
    """
    B, T, D = h.shape
    w = _prepare(weights, h.dtype)
    GH, RH, GO = w.w_g1.shape[0], w.w_p1.shape[0], w.w_g2.shape[0]
    bm, spb, opts = _launch(T, block_m)
    M, dev, dt = B * T, h.device, h.dtype
    h2 = h.contiguous()
    out = _new((B, T, D), dt, dev)
    z, g1, p1 = _new((M, D), dt, dev), _new((M, GH), dt, dev), _new((M, RH), dt, dev)
    m, l = _new((M,), torch.float32, dev), _new((M,), torch.float32, dev)
    if save:
        u, g, hhat = _new((M, D), dt, dev), _new((M, GO), dt, dev), _new((M, D), dt, dev)
        s = _new((M,), torch.float32, dev)
    else:
        u = g = hhat = s = out  # never touched: SAVE is off
    if state is not None:
        m0, l0, a0 = state.m.contiguous(), state.l.contiguous(), state.a.contiguous()
    else:
        m0 = l0 = a0 = out  # never touched: HAS_STATE is off
    a_out = _new((B, D), a0.dtype if state is not None else torch.float32, dev) if return_state else out
    mask8 = mask.reshape(M).to(torch.int8) if mask is not None else out
    _star_fwd_kernel[(triton.cdiv(B, spb),)](
        h2, mask8, *w, m0, l0, a0, out, z, g1, p1, u, g, hhat, s, m, l, a_out,
        B, T, D, GH, RH, spb,
        HAS_MASK=mask is not None, HAS_STATE=state is not None, STATE_OUT=return_state, SAVE=save,
        SCALAR_GATE=GO == 1 and D != 1, PREC=_precision(dt), BLOCK_M=bm, BLOCK_D=BLOCK_D, **opts,
    )
    new_state = None
    if return_state:
        sdt = a_out.dtype
        new_state = StarState(m.view(B, T)[:, -1].to(sdt), l.view(B, T)[:, -1].to(sdt), a_out)
    saved = (z, g1, p1, u, g, hhat, s, m, l) if save else None
    return out, new_state, saved


def star_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weights: StarWeights,
    mask: torch.Tensor | None,
    saved: tuple[torch.Tensor, ...],
    *,
    block_m: int | None = None,
) -> tuple[torch.Tensor, StarWeights]:
    """Gradients of star_forward (empty initial state): dL/dh [B, T, d] and dL/d(each weight).

    The kernel gives dL/dh and the pre-activation gradients; dW = dA^T X and db = sum(dA) are
    reductions over all B*T rows, done by cuBLAS (torch.mm) with the whole chip.
    """
    B, T, D = h.shape
    w = _prepare(weights, h.dtype)
    GH, RH, GO = w.w_g1.shape[0], w.w_p1.shape[0], w.w_g2.shape[0]
    bm, spb, opts = _launch(T, block_m)
    M, dev, dt = B * T, h.device, h.dtype
    z, g1, p1, u, g, hhat, s, m, l = saved
    h2, dy2 = h.contiguous().view(M, D), dy.contiguous()
    dh = _new((B, T, D), dt, dev)
    dhhat, dga = _new((M, D), dt, dev), _new((M, GO), dt, dev)
    dg1, dp1 = _new((M, GH), dt, dev), _new((M, RH), dt, dev)
    dz, ds, dpa = _new((M, D), torch.float32, dev), _new((M,), torch.float32, dev), _new((M, D), dt, dev)
    mask8 = mask.reshape(M).to(torch.int8) if mask is not None else h2
    _star_bwd_kernel[(triton.cdiv(B, spb),)](
        dy2, h2, mask8, w.w_a, w.q, w.w_g1, w.w_g2, w.w_p1, w.w_p2,
        z, g1, p1, u, g, hhat, s, m, l,
        dh, dhhat, dga, dg1, dp1, dz, ds, dpa,
        B, T, D, GH, RH, spb,
        HAS_MASK=mask is not None, SCALAR_GATE=GO == 1 and D != 1, PREC=_precision(dt),
        BLOCK_M=bm, BLOCK_D=BLOCK_D, **opts,
    )
    grads = StarWeights(
        w_a=dpa.t() @ h2, b_a=dpa.sum(0), q=(ds.to(dt) @ u),
        w_g1=dg1.t() @ z, b_g1=dg1.sum(0), w_g2=dga.t() @ g1, b_g2=dga.sum(0),
        w_p1=dp1.t() @ z, b_p1=dp1.sum(0), w_p2=dhhat.t() @ p1, b_p2=dhhat.sum(0),
    )
    return dh, grads


def star_step(
    h_t: torch.Tensor, weights: StarWeights, state: StarState, *, block_m: int | None = None
) -> tuple[torch.Tensor, StarState]:
    """One decoding position: h_t [B, d] and the state before it -> (h'_t [B, d], new state).

    The forward kernel with T = 1 and the state as carry (StarModule.step in one launch).
    """
    out, new_state, _ = star_forward(h_t[:, None, :], weights, None, state, return_state=True, block_m=block_m)
    return out[:, 0], new_state


class StarFunction(torch.autograd.Function):
    """h' = STAR(h) with the fused forward and backward kernels.

    apply(h [B, T, d], mask [B, T] or None, *StarWeights) -> h' [B, T, d].
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, mask: torch.Tensor | None, *weights: torch.Tensor) -> torch.Tensor:
        out, _, saved = star_forward(h, StarWeights(*weights), mask, save=True)
        ctx.save_for_backward(h, mask, *weights, *saved)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        h, mask, *rest = ctx.saved_tensors
        n = len(StarWeights._fields)
        dh, grads = star_backward(dy, h, StarWeights(*rest[:n]), mask, tuple(rest[n:]))
        return (dh, None, *grads)


def module_weights(module: torch.nn.Module) -> StarWeights:
    """The StarWeights of a kernels.reference.StarModule (views, no copies)."""
    return StarWeights(
        module.score_proj.weight, module.score_proj.bias, module.score_vec,
        module.gate_fc1.weight, module.gate_fc1.bias, module.gate_fc2.weight, module.gate_fc2.bias,
        module.refine_fc1.weight, module.refine_fc1.bias, module.refine_fc2.weight, module.refine_fc2.bias,
    )


def fused_forward(module: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """StarModule.forward through the kernels: autograd when anything needs a gradient."""
    weights = module_weights(module)
    if torch.is_grad_enabled() and (h.requires_grad or any(w.requires_grad for w in weights)):
        return StarFunction.apply(h, mask, *weights)
    return star_forward(h, weights, mask)[0]


def fused_step(module: torch.nn.Module, h_t: torch.Tensor, state: StarState) -> tuple[torch.Tensor, StarState]:
    """StarModule.step through the kernel (no autograd: decoding)."""
    return star_step(h_t, module_weights(module), state)
