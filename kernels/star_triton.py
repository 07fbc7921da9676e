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
BLOCK_N-wide column tiles and BLOCK_K-deep K tiles with tl.dot (Tiles), and hands its result to
the next stage through a row-block of global memory (z, relu(W_g1 z), relu(W_p1 z)) that stays in
L2 and that the backward needs anyway. The [BLOCK_M, BLOCK_M] causal weight matrix
e^{s_i - m_t} is built in registers from the scores, so the pooling is one more tl.dot per column
tile.

The decode step is the same kernel with T = 1 and the streaming state (m, l, a) of each
sequence as the carry (kernels/state.py): the carried sum enters with weight e^{m - m'} exactly as
in the reference's pool_step, and the kernel writes the new state.

Backward (_star_bwd_kernel): the same row layout, recomputing the softmax weights from the saved
s, m, l. It produces dL/dh, the gradients of the five pre-activations, and per program the column
sums of those gradients (the bias gradients and dL/dq, summed over programs by one torch.sum).
The weight gradients are reductions over all B*T rows (dW = dA^T X), which cuBLAS does with the
full chip: three calls, because the kernel lays dL/d(W_g1 z) and dL/d(W_p1 z) side by side (one
GEMM against z) and the two second-layer problems as a batch of two.

Host cost: both directions are host-bound at the training shape (docs/kernel.md), so each call
allocates three buffers (the output and one workspace per dtype, carved by element offsets inside
the kernels), passes weights that already have h's dtype without copies, and views a bool mask as
int8 rather than converting it.

Matmul precision follows PyTorch's: float32 inputs use IEEE float32 products unless
torch.get_float32_matmul_precision() is "high"/"medium" (then TF32, as cuBLAS would); float16 and
bfloat16 inputs multiply in their own type with float32 accumulation.

Measured on an H200 (docs/kernel.md): at B=128, T=41, d=512 the bfloat16 fwd+bwd is 2.05x faster
than eager and host-bound (0.84 ms of host time for 0.40 ms of GPU work), the forward 2.5x and the
decode step 3.2-5.2x. In float32 with TF32 off the dots run on FMA units, 2.4x slower than eager, so
StarModule(backend="auto") runs the reference there.

Launch settings (tile shapes, smallest row blocks) are an argument of every host function
(LaunchSettings, default the measured best), so a tuning sweep passes its own.

Layout after Liger-Kernel's ops (one file: jit kernels, host functions, autograd.Function); like
theirs it imports only what it builds on, the streaming state (kernels/state.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .state import EMPTY_MAX, StarState

# A program holds a [BLOCK_M, BLOCK_M] float32 weight tile; 128 x 128 over 8 warps is 64
# registers a thread. Longer sequences go to the reference (training uses T <= 41).
MAX_T = 128
_EMPTY = tl.constexpr(EMPTY_MAX)  # jit code reads globals only as constexpr
_NEG_INF = tl.constexpr(float("-inf"))
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Tiles(NamedTuple):
    """Shape of every tl.dot step and how many K steps the loads run ahead (num_stages).

    For 16-bit inputs; float32 inputs take half a K depth above 64 (same bytes a step), and the
    pipeline depth is cut where it would pass SMEM_BUDGET bytes of shared memory.
    """

    block_n: int  # output columns of a step
    block_k: int  # reduction depth of a step
    num_stages: int  # software-pipeline depth of the K loops


@dataclass(frozen=True)
class LaunchSettings:
    """How the host functions launch the kernels; frozen and hashable, so it keys the plan caches."""

    # On an H200 (docs/kernel.md) the bfloat16 forward at B = 128, T = 41 took 0.148 ms with
    # 64x128x4 against 0.183 ms with 64x64x3 (64x128x3 and 64x64x5: 0.150, 0.147 ms); the CUDA
    # tests ran this one.
    tiles: Tiles = Tiles(64, 128, 4)
    # Smallest row block: tensor-core tiles want M >= 64 (wgmma is 64 rows per warpgroup); 128
    # was slower at every shape measured.
    min_block_m: int = 64
    # Row block of a decode step (star_step): 16 pads a small batch less; on an H200 the bfloat16
    # step took 0.11 ms against 0.15-0.19 ms with 64 rows at B = 1..128 (docs/kernel.md).
    min_step_block_m: int = 16


DEFAULT_LAUNCH = LaunchSettings()

# Shared memory for the pipelined operand tiles: sm_90 gives a block 227 KB, and the backward's
# transposes and the pooling tiles need room beside the pipeline.
SMEM_BUDGET = 160 * 1024
_ALIGN = 64  # workspace regions start at multiples of 64 elements (Triton and cuBLAS want 16 B)


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
def _mm(
    acc,  # [BLOCK_M, BLOCK_N] float32, added to
    x_ptr,  # element (row, k) at row * ldx + k
    ldx,
    rows,  # [BLOCK_M] row indices
    row_ok,  # [BLOCK_M] bool
    K,
    w_ptr,  # element (n, k) at n * stride_wn + k * stride_wk
    n,  # [BLOCK_N] output columns
    n_ok,  # [BLOCK_N] bool
    stride_wn,
    stride_wk,
    PREC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc + X[rows, :K] @ W[n, :K]^T in float32."""
    offs = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * ldx + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
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
# (Triton would compile again for every value that is 1 or a multiple of 16). The workspace
# offsets are multiples of _ALIGN, so their specialisation (divisible by 16) never changes.
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
    ws_ptr,  # workspace in h's dtype: z [M, D] at 0 (stage 2 -> 3), g1 [M, GH], p1 [M, RH]
    #          (stage 3 -> 4), and with SAVE u [M, D], g [M, GO], hhat [M, D]
    rs_ptr,  # float32 workspace: m [M] at 0, l [M] (running max and normaliser), s [M] (SAVE)
    m_out_ptr,  # [B] running max after each sequence's last row (STATE_OUT)
    l_out_ptr,  # [B] normaliser after it (STATE_OUT)
    a_out_ptr,  # [B, D] weighted sum after it (STATE_OUT)
    OFF_G1, OFF_P1, OFF_U, OFF_G, OFF_HHAT,  # element offsets in ws
    OFF_L, OFF_S,  # element offsets in rs
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    j, seq, valid, rows = _rows(pid, B, T, SPB, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    dtype = h_ptr.dtype.element_ty
    z_ptr, g1_ptr, p1_ptr = ws_ptr, ws_ptr + OFF_G1, ws_ptr + OFF_P1
    u_ptr, g_ptr, hhat_ptr = ws_ptr + OFF_U, ws_ptr + OFF_G, ws_ptr + OFF_HHAT
    m_ptr, l_ptr, s_ptr = rs_ptr, rs_ptr + OFF_L, rs_ptr + OFF_S
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # 1. score s = q . tanh(W_a h + b_a)                                            [BLOCK_M]
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + offs
        n_ok = n < D
        acc = _mm(zero, h_ptr, D, rows, valid, D, wa_ptr, n, n_ok, D, 1, PREC, BLOCK_K)
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
    if STATE_OUT:
        tl.store(m_out_ptr + seq, m.to(m_out_ptr.dtype.element_ty), mask=last)
        tl.store(l_out_ptr + seq, l.to(l_out_ptr.dtype.element_ty), mask=last)
    w = w.to(dtype)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        hk = tl.load(h_ptr + rows[:, None] * D + n[None, :], mask=tile_ok, other=0.0)
        a = tl.dot(w, hk, input_precision=PREC)  # [BLOCK_M, BLOCK_N]
        if HAS_STATE:
            a0 = tl.load(a0_ptr + seq[:, None] * D + n[None, :], mask=tile_ok, other=0.0)
            a += carry[:, None] * a0.to(tl.float32)
        tl.store(z_ptr + rows[:, None] * D + n[None, :], (a * inv_l[:, None]).to(dtype), mask=tile_ok)
        if STATE_OUT:
            a_ptrs = a_out_ptr + seq[:, None] * D + n[None, :]
            tl.store(a_ptrs, a.to(a_out_ptr.dtype.element_ty), mask=last[:, None] & n_ok[None, :])
    tl.debug_barrier()  # z is read back below by other threads of this program

    # 3. first layers of both FFNs                                     [BLOCK_M, GH], [BLOCK_M, RH]
    for n0 in range(0, GH, BLOCK_N):
        n = n0 + offs
        n_ok = n < GH
        acc = _mm(zero, z_ptr, D, rows, valid, D, wg1_ptr, n, n_ok, D, 1, PREC, BLOCK_K)
        acc = tl.maximum(acc + tl.load(bg1_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :], 0.0)
        tl.store(g1_ptr + rows[:, None] * GH + n[None, :], acc.to(dtype), mask=valid[:, None] & n_ok[None, :])
    for n0 in range(0, RH, BLOCK_N):
        n = n0 + offs
        n_ok = n < RH
        acc = _mm(zero, z_ptr, D, rows, valid, D, wp1_ptr, n, n_ok, D, 1, PREC, BLOCK_K)
        acc = tl.maximum(acc + tl.load(bp1_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :], 0.0)
        tl.store(p1_ptr + rows[:, None] * RH + n[None, :], acc.to(dtype), mask=valid[:, None] & n_ok[None, :])
    tl.debug_barrier()

    # 4. second layers, gate and mix                                                [BLOCK_M, D]
    if SCALAR_GATE:
        ga = tl.zeros((BLOCK_M,), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, GH, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < GH
            g1 = tl.load(g1_ptr + rows[:, None] * GH + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            ga += tl.sum(g1.to(tl.float32) * tl.load(wg2_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :], axis=1)
        gs = tl.sigmoid(ga + tl.load(bg2_ptr).to(tl.float32))
        if SAVE:
            tl.store(g_ptr + rows, gs.to(dtype), mask=valid)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        hhat = _mm(zero, p1_ptr, RH, rows, valid, RH, wp2_ptr, n, n_ok, RH, 1, PREC, BLOCK_K)
        hhat += tl.load(bp2_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SCALAR_GATE:
            g = gs[:, None]
        else:
            g = _mm(zero, g1_ptr, GH, rows, valid, GH, wg2_ptr, n, n_ok, GH, 1, PREC, BLOCK_K)
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
    ws_ptr,  # the forward's workspace (z, g1, p1, u, g, hhat; layout as in _star_fwd_kernel)
    rs_ptr,  # the forward's float32 workspace (m, l, s)
    dh_ptr,  # [M, D] dL/dh (output)
    wb_ptr,  # workspace in h's dtype (outputs, for the weight gradients): dga [M, GO] at 0
    #          (dL/d(W_g2 . + b_g2)), dhhat [M, D] (dy g), dgp [M, GH + RH] (dL/d(W_g1 z + b_g1)
    #          in columns :GH, dL/d(W_p1 z + b_p1) in GH:), dpa [M, D] (dL/d(W_a h + b_a))
    rb_ptr,  # float32 workspace: dz [M, D] at 0 (dL/dz, scratch), then per program one row of
    #          NB = 3D + GH + GO + RH column sums: b_a, q, b_g1, b_g2, b_p1, b_p2 gradients
    OFF_G1, OFF_P1, OFF_U, OFF_G, OFF_HHAT, OFF_L, OFF_S,  # the forward's offsets
    OFF_DHH, OFF_DGP, OFF_DPA, OFF_PART,  # offsets in wb (dhhat, dgp, dpa) and rb (partial sums)
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
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    j, seq, valid, rows = _rows(pid, B, T, SPB, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    dtype = h_ptr.dtype.element_ty
    g1_ptr, p1_ptr = ws_ptr + OFF_G1, ws_ptr + OFF_P1  # (z, at 0, only feeds the dW GEMMs)
    u_ptr, g_ptr, hhat_ptr = ws_ptr + OFF_U, ws_ptr + OFF_G, ws_ptr + OFF_HHAT
    m_ptr, l_ptr, s_ptr = rs_ptr, rs_ptr + OFF_L, rs_ptr + OFF_S
    dga_ptr, dhhat_ptr, dgp_ptr, dpa_ptr = wb_ptr, wb_ptr + OFF_DHH, wb_ptr + OFF_DGP, wb_ptr + OFF_DPA
    dz_ptr = rb_ptr
    LDP = GH + RH  # row stride of dgp
    if SCALAR_GATE:
        GO = 1
    else:
        GO = D
    part_ptr = rb_ptr + OFF_PART + pid * (3 * D + GH + GO + RH)  # this program's column sums
    P_Q, P_BG1, P_BG2 = D, 2 * D, 2 * D + GH
    P_BP1, P_BP2 = 2 * D + GH + GO, 2 * D + GH + GO + RH
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Rows outside the block load as 0 everywhere below, so every gradient tile is 0 there and the
    # column sums need no extra mask.

    # 1. mix and gate: h' = h + g (hhat - h)
    if SCALAR_GATE:
        gs = tl.load(g_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        dgs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        ptrs = rows[:, None] * D + n[None, :]
        dy = tl.load(dy_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        dg = dy * (tl.load(hhat_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
                   - tl.load(h_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32))  # dL/dg
        if SCALAR_GATE:
            g = gs[:, None]
            dgs += tl.sum(dg, axis=1)
        else:
            g = tl.load(g_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
            dga = dg * g * (1.0 - g)
            tl.store(dga_ptr + ptrs, dga.to(dtype), mask=tile_ok)
            tl.store(part_ptr + P_BG2 + n, tl.sum(dga, axis=0), mask=n_ok)
        dhh = dy * g
        tl.store(dhhat_ptr + ptrs, dhh.to(dtype), mask=tile_ok)
        tl.store(part_ptr + P_BP2 + n, tl.sum(dhh, axis=0), mask=n_ok)
    if SCALAR_GATE:
        dga_rows = dgs * gs * (1.0 - gs)
        tl.store(dga_ptr + rows, dga_rows.to(dtype), mask=valid)
        tl.store(part_ptr + P_BG2, tl.sum(dga_rows, axis=0))
    tl.debug_barrier()

    # 2. back through the second layers and the relus                 [BLOCK_M, GH], [BLOCK_M, RH]
    if SCALAR_GATE:
        dga_col = tl.load(dga_ptr + rows, mask=valid, other=0.0).to(tl.float32)
    for n0 in range(0, GH, BLOCK_N):
        n = n0 + offs
        n_ok = n < GH
        tile_ok = valid[:, None] & n_ok[None, :]
        if SCALAR_GATE:
            acc = dga_col[:, None] * tl.load(wg2_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:
            acc = _mm(zero, dga_ptr, D, rows, valid, D, wg2_ptr, n, n_ok, 1, GH, PREC, BLOCK_K)
        g1 = tl.load(g1_ptr + rows[:, None] * GH + n[None, :], mask=tile_ok, other=0.0)
        dg1 = tl.where(g1 > 0, acc, 0.0)
        tl.store(dgp_ptr + rows[:, None] * LDP + n[None, :], dg1.to(dtype), mask=tile_ok)
        tl.store(part_ptr + P_BG1 + n, tl.sum(dg1, axis=0), mask=n_ok)
    for n0 in range(0, RH, BLOCK_N):
        n = n0 + offs
        n_ok = n < RH
        tile_ok = valid[:, None] & n_ok[None, :]
        acc = _mm(zero, dhhat_ptr, D, rows, valid, D, wp2_ptr, n, n_ok, 1, RH, PREC, BLOCK_K)
        p1 = tl.load(p1_ptr + rows[:, None] * RH + n[None, :], mask=tile_ok, other=0.0)
        dp1 = tl.where(p1 > 0, acc, 0.0)
        tl.store(dgp_ptr + GH + rows[:, None] * LDP + n[None, :], dp1.to(dtype), mask=tile_ok)
        tl.store(part_ptr + P_BP1 + n, tl.sum(dp1, axis=0), mask=n_ok)
    tl.debug_barrier()

    # 3. dL/dz                                                                        [BLOCK_M, D]
    for n0 in range(0, D, BLOCK_N):
        n = n0 + offs
        n_ok = n < D
        dz = _mm(zero, dgp_ptr, LDP, rows, valid, GH, wg1_ptr, n, n_ok, 1, D, PREC, BLOCK_K)
        dz = _mm(dz, dgp_ptr + GH, LDP, rows, valid, RH, wp1_ptr, n, n_ok, 1, D, PREC, BLOCK_K)
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
    for n0 in range(0, D, BLOCK_N):
        n = n0 + offs
        tile_ok = valid[:, None] & (n < D)[None, :]
        ptrs = rows[:, None] * D + n[None, :]
        dz = tl.load(dz_ptr + ptrs, mask=tile_ok, other=0.0)
        hk = tl.load(h_ptr + ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        e = tl.dot(dz, tl.trans(hk), e, input_precision=PREC)
        tl.store(dh_ptr + ptrs, tl.dot(pt, dz, input_precision=PREC).to(dtype), mask=tile_ok)
    ds = tl.sum(p * (e - tl.sum(p * e, axis=1)[:, None]), axis=0)  # [BLOCK_M], 0 outside the block

    # 5. score: dL/d(W_a h + b_a) = ds q (1 - u^2); dL/dq = sum_rows ds u
    for n0 in range(0, D, BLOCK_N):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        u = tl.load(u_ptr + rows[:, None] * D + n[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        qn = tl.load(q_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        dpa = ds[:, None] * qn[None, :] * (1.0 - u * u)
        tl.store(dpa_ptr + rows[:, None] * D + n[None, :], dpa.to(dtype), mask=tile_ok)
        tl.store(part_ptr + n, tl.sum(dpa, axis=0), mask=n_ok)
        tl.store(part_ptr + P_Q + n, tl.sum(ds[:, None] * u, axis=0), mask=n_ok)
    tl.debug_barrier()

    # 6. dL/dh = dy (1 - g) + pooling path + score path
    for n0 in range(0, D, BLOCK_N):
        n = n0 + offs
        n_ok = n < D
        tile_ok = valid[:, None] & n_ok[None, :]
        ptrs = rows[:, None] * D + n[None, :]
        acc = _mm(zero, dpa_ptr, D, rows, valid, D, wa_ptr, n, n_ok, 1, D, PREC, BLOCK_K)
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


def unsupported(h: torch.Tensor) -> str | None:
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


class _Launch(NamedTuple):
    block_m: int
    seqs_per_program: int
    block_n: int
    block_k: int
    options: dict  # num_warps, num_stages


def _launch(T: int, block_m: int | None, dtype: torch.dtype, settings: LaunchSettings) -> _Launch:
    """Row block (whole sequences), tiles and launch options for sequences of length T."""
    if T > MAX_T:
        raise ValueError(f"the fused STAR kernel handles T <= {MAX_T}, got {T}")
    bm = block_m or max(settings.min_block_m, 1 << (T - 1).bit_length())  # next power of two >= T
    if bm < T or bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two >= max(16, T={T}), got {bm}")
    tiles, size = settings.tiles, dtype.itemsize
    bk = tiles.block_k if size <= 2 or tiles.block_k <= 64 else tiles.block_k // 2
    stage_bytes = (bm * bk + bk * tiles.block_n) * size
    stages = max(2, min(tiles.num_stages, SMEM_BUDGET // stage_bytes))
    # ptxas for sm_90 (Triton 3.9, compiled here without a GPU), bfloat16, 64 rows on 8 warps,
    # 64x128 tiles 4 deep: forward 172 registers, backward 254 and no spills with a mask (56 bytes
    # spilled without); 4 warps spilled at 64 rows. 16-32 row blocks (decode) use 4 warps.
    return _Launch(bm, bm // T, tiles.block_n, bk, dict(num_warps=4 if bm <= 32 else 8, num_stages=stages))


def _regions(*sizes: int) -> tuple[list[int], int]:
    """Start of each of a row of workspace regions (elements, multiples of _ALIGN) and the total."""
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    return starts, total


@functools.lru_cache(maxsize=256)  # called on every launch with the same few shapes
def _fwd_layout(M: int, D: int, GH: int, RH: int, GO: int, save: bool):
    """Offsets and sizes of the forward's workspaces: (z, g1, p1, u, g, hhat) in h's dtype and
    (m, l, s) in float32; u, g, hhat, s only when saving for the backward."""
    ws, ws_n = _regions(M * D, M * GH, M * RH, *((M * D, M * GO, M * D) if save else ()))
    rs, rs_n = _regions(M, M, *((M,) if save else ()))
    ws += [0] * (6 - len(ws))  # unused regions: never touched
    rs += [0] * (3 - len(rs))
    return tuple(ws), ws_n, tuple(rs), rs_n


@functools.lru_cache(maxsize=256)
def _bwd_layout(M: int, D: int, GH: int, RH: int, GO: int, P: int):
    """Offsets and sizes of the backward's workspaces: (dga, dhhat, dgp, dpa) in h's dtype and
    (dz, P rows of column sums) in float32."""
    wb, wb_n = _regions(M * GO, M * D, M * (GH + RH), M * D)
    rb, rb_n = _regions(M * D, P * sum(_bias_sizes(D, GH, GO, RH)))
    return tuple(wb), wb_n, tuple(rb), rb_n


def _bias_sizes(D: int, GH: int, GO: int, RH: int) -> list[int]:
    """Columns of the backward's per-program sums: b_a, q, b_g1, b_g2, b_p1, b_p2 gradients."""
    return [D, D, GH, GO, RH, D]


class _FwdPlan(NamedTuple):
    grid: tuple[int]
    ws_n: int  # workspace elements in h's dtype
    rs_n: int  # float32 workspace elements
    scalars: tuple[int, ...]  # the kernel's integer arguments after the pointers
    meta: dict  # constexpr arguments and launch options


# A training run calls with the same few shapes: everything but the tensors is computed once per
# shape (2-core CPU, launches stubbed, B=1, T=2, d=8: star_forward 19 -> 12 us, star_backward
# 53 -> 45 us; docs/kernel.md). The precision is in the key: PyTorch's setting is read at each call.
@functools.lru_cache(maxsize=256)
def _fwd_plan(B: int, T: int, D: int, GH: int, RH: int, GO: int, dtype: torch.dtype, block_m: int | None,
              flags: tuple[bool, bool, bool, bool], prec: str, settings: LaunchSettings) -> _FwdPlan:
    """Grid, workspace sizes, integer arguments and constexprs of one forward launch; flags are
    (HAS_MASK, HAS_STATE, STATE_OUT, SAVE)."""
    launch = _launch(T, block_m, dtype, settings)
    has_mask, has_state, state_out, save = flags
    ws_off, ws_n, rs_off, rs_n = _fwd_layout(B * T, D, GH, RH, GO, save)
    meta = dict(HAS_MASK=has_mask, HAS_STATE=has_state, STATE_OUT=state_out, SAVE=save,
                SCALAR_GATE=GO == 1 and D != 1, PREC=prec, BLOCK_M=launch.block_m,
                BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, **launch.options)
    grid = (-(-B // launch.seqs_per_program),)
    return _FwdPlan(grid, ws_n, rs_n, (*ws_off[1:], *rs_off[1:], B, T, D, GH, RH, launch.seqs_per_program), meta)


class _BwdPlan(NamedTuple):
    grid: tuple[int]
    wb_n: int
    rb_n: int
    scalars: tuple[int, ...]
    meta: dict
    o_g1: int  # forward workspace offsets of relu(W_g1 z), relu(W_p1 z)
    o_p1: int
    o_dgp: int  # backward workspace offsets of the pre-activation gradients
    o_dhh: int
    o_dpa: int
    o_part: int  # float32 workspace offset of the per-program column sums
    sizes: tuple[int, ...]  # columns of those sums (_bias_sizes)


@functools.lru_cache(maxsize=256)
def _bwd_plan(B: int, T: int, D: int, GH: int, RH: int, GO: int, dtype: torch.dtype, block_m: int | None,
              has_mask: bool, prec: str, settings: LaunchSettings) -> _BwdPlan:
    """Grid, workspace sizes and offsets, integer arguments and constexprs of one backward."""
    launch = _launch(T, block_m, dtype, settings)
    M, P = B * T, -(-B // launch.seqs_per_program)
    ws_off, _, rs_off, _ = _fwd_layout(M, D, GH, RH, GO, True)
    (_, o_dhh, o_dgp, o_dpa), wb_n, (_, o_part), rb_n = _bwd_layout(M, D, GH, RH, GO, P)
    meta = dict(HAS_MASK=has_mask, SCALAR_GATE=GO == 1 and D != 1, PREC=prec, BLOCK_M=launch.block_m,
                BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, **launch.options)
    scalars = (*ws_off[1:], *rs_off[1:], o_dhh, o_dgp, o_dpa, o_part, B, T, D, GH, RH, launch.seqs_per_program)
    return _BwdPlan((P,), wb_n, rb_n, scalars, meta, ws_off[1], ws_off[2], o_dgp, o_dhh, o_dpa, o_part,
                    tuple(_bias_sizes(D, GH, GO, RH)))


def _prepare(weights: StarWeights, dtype: torch.dtype) -> StarWeights:
    """The weights in h's dtype, contiguous: the tensors themselves when they already are (the
    usual case, no copy), else cast copies."""
    if all(w.dtype == dtype and w.is_contiguous() for w in weights):
        return StarWeights(*weights)
    return StarWeights(*(w.detach().to(dtype).contiguous() for w in weights))


def _mask_int8(mask: torch.Tensor, M: int) -> torch.Tensor:
    """[B, T] mask as the kernels' int8 [M] view (a bool mask is viewed, not converted)."""
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.reshape(M).view(torch.int8)


def star_forward(
    h: torch.Tensor,
    weights: StarWeights,
    mask: torch.Tensor | None = None,
    state: StarState | None = None,
    *,
    save: bool = False,
    return_state: bool = False,
    block_m: int | None = None,
    settings: LaunchSettings = DEFAULT_LAUNCH,
) -> tuple[torch.Tensor, StarState | None, tuple[torch.Tensor, ...] | None]:
    """Fused STAR forward over a block.

    h: [B, T, d]; mask: [B, T] (nonzero = real token) or None; state: the streaming state before
    the block (StarState with m [B], l [B], a [B, d]) or None for the empty state.
    Returns (h' [B, T, d], the state after the block if return_state, what star_backward needs if
    save: (the casted weights, the two workspaces)). block_m: the row block, a power of two >= T
    (default the smallest such one of at least settings.min_block_m rows).
    """
    B, T, D = h.shape
    dev, dt = h.device, h.dtype
    w = _prepare(weights, dt)
    GH, RH, GO = w.w_g1.shape[0], w.w_p1.shape[0], w.w_g2.shape[0]
    plan = _fwd_plan(B, T, D, GH, RH, GO, dt, block_m, (mask is not None, state is not None, return_state, save),
                     _precision(dt), settings)
    h2 = h.contiguous()
    out = _new((B, T, D), dt, dev)
    ws, rs = _new((plan.ws_n,), dt, dev), _new((plan.rs_n,), torch.float32, dev)
    if state is not None:
        m0, l0, a0 = state.m.contiguous(), state.l.contiguous(), state.a.contiguous()
    else:
        m0 = l0 = a0 = out  # never touched: HAS_STATE is off
    if return_state:
        sdt = a0.dtype if state is not None else torch.float32
        m_out, l_out, a_out = _new((B,), sdt, dev), _new((B,), sdt, dev), _new((B, D), sdt, dev)
    else:
        m_out = l_out = a_out = out  # never touched: STATE_OUT is off
    mask8 = _mask_int8(mask, B * T) if mask is not None else out
    _star_fwd_kernel[plan.grid](h2, mask8, *w, m0, l0, a0, out, ws, rs, m_out, l_out, a_out, *plan.scalars,
                                **plan.meta)
    new_state = StarState(m_out, l_out, a_out) if return_state else None
    return out, new_state, ((*w, ws, rs) if save else None)


def star_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    mask: torch.Tensor | None,
    saved: tuple[torch.Tensor, ...],
    *,
    block_m: int | None = None,
    settings: LaunchSettings = DEFAULT_LAUNCH,
) -> tuple[torch.Tensor, StarWeights]:
    """Gradients of star_forward (empty initial state): dL/dh [B, T, d] and dL/d(each weight).

    saved: what star_forward(..., save=True) returned, with the same block_m and settings. The
    kernel gives dL/dh, the pre-activation gradients and per-program column sums (bias gradients,
    dL/dq); dW = dA^T X are reductions over all B*T rows, done by cuBLAS with the whole chip.
    """
    B, T, D = h.shape
    n_w = len(StarWeights._fields)
    w, (ws, rs) = StarWeights(*saved[:n_w]), saved[n_w:]
    GH, RH, GO = w.w_g1.shape[0], w.w_p1.shape[0], w.w_g2.shape[0]
    M, dev, dt = B * T, h.device, h.dtype
    pl = _bwd_plan(B, T, D, GH, RH, GO, dt, block_m, mask is not None, _precision(dt), settings)
    h2, dy2 = h.contiguous(), dy.contiguous()
    dh = _new((B, T, D), dt, dev)
    wb, rb = _new((pl.wb_n,), dt, dev), _new((pl.rb_n,), torch.float32, dev)
    mask8 = _mask_int8(mask, M) if mask is not None else h2
    _star_bwd_kernel[pl.grid](dy2, h2, mask8, w.w_a, w.q, w.w_g1, w.w_g2, w.w_p1, w.w_p2, ws, rs, dh, wb, rb,
                              *pl.scalars, **pl.meta)
    # dW = dA^T X over all rows: [W_a], [W_g1; W_p1] against z in one GEMM, [W_g2, W_p2] as a
    # batch of two where their shapes agree.
    o_g1, o_p1, o_dhh, o_dpa, sizes = pl.o_g1, pl.o_p1, pl.o_dhh, pl.o_dpa, pl.sizes
    dw_a = torch.mm(wb.as_strided((D, M), (1, D), o_dpa), h2.view(M, D))
    dw_g1, dw_p1 = torch.mm(wb.as_strided((GH + RH, M), (1, GH + RH), pl.o_dgp),
                            ws.as_strided((M, D), (D, 1), 0)).split([GH, RH])
    if GO == D and GH == RH:
        dw_g2, dw_p2 = torch.bmm(wb.as_strided((2, D, M), (o_dhh, 1, D), 0),
                                 ws.as_strided((2, M, GH), (o_p1 - o_g1, GH, 1), o_g1))
    else:
        dw_g2 = torch.mm(wb.as_strided((GO, M), (1, GO), 0), ws.as_strided((M, GH), (GH, 1), o_g1))
        dw_p2 = torch.mm(wb.as_strided((D, M), (1, D), o_dhh), ws.as_strided((M, RH), (RH, 1), o_p1))
    n_part = sum(sizes)
    db_a, dq, db_g1, db_g2, db_p1, db_p2 = rb.as_strided((pl.grid[0], n_part), (n_part, 1), pl.o_part).sum(0).to(
        dt).split(sizes)
    grads = StarWeights(dw_a, db_a, dq, dw_g1, db_g1, dw_g2, db_g2, dw_p1, db_p1, dw_p2, db_p2)
    return dh, grads


def star_step(
    h_t: torch.Tensor, weights: StarWeights, state: StarState, *, block_m: int | None = None,
    settings: LaunchSettings = DEFAULT_LAUNCH,
) -> tuple[torch.Tensor, StarState]:
    """One decoding position: h_t [B, d] and the state before it -> (h'_t [B, d], new state).

    The forward kernel with T = 1 and the state as carry (StarModule.step in one launch), on
    blocks of settings.min_step_block_m sequences unless block_m says otherwise.
    """
    out, new_state, _ = star_forward(h_t[:, None, :], weights, None, state, return_state=True,
                                     block_m=block_m or settings.min_step_block_m, settings=settings)
    return out[:, 0], new_state


class StarFunction(torch.autograd.Function):
    """h' = STAR(h) with the fused forward and backward kernels.

    apply(h [B, T, d], mask [B, T] or None, LaunchSettings, *StarWeights) -> h' [B, T, d].
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, mask: torch.Tensor | None, settings: LaunchSettings,
                *weights: torch.Tensor) -> torch.Tensor:
        out, _, saved = star_forward(h, StarWeights(*weights), mask, save=True, settings=settings)
        ctx.save_for_backward(h, mask, *saved)
        ctx.settings = settings
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        h, mask, *saved = ctx.saved_tensors
        dh, grads = star_backward(dy, h, mask, tuple(saved), settings=ctx.settings)
        return (dh, None, None, *grads)  # autograd casts a gradient to its weight's dtype where they differ


def module_weights(module: torch.nn.Module) -> StarWeights:
    """The StarWeights of a kernels.module.StarModule (views, no copies)."""
    # the module's dicts, not nn.Module.__getattr__: 21 attribute look-ups took 14 us a call on a CPU
    sub, p = module._modules, module._parameters
    return StarWeights(
        sub["score_proj"]._parameters["weight"], sub["score_proj"]._parameters["bias"], p["score_vec"],
        sub["gate_fc1"]._parameters["weight"], sub["gate_fc1"]._parameters["bias"],
        sub["gate_fc2"]._parameters["weight"], sub["gate_fc2"]._parameters["bias"],
        sub["refine_fc1"]._parameters["weight"], sub["refine_fc1"]._parameters["bias"],
        sub["refine_fc2"]._parameters["weight"], sub["refine_fc2"]._parameters["bias"],
    )


def fused_forward(module: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor | None = None, *,
                  settings: LaunchSettings = DEFAULT_LAUNCH) -> torch.Tensor:
    """StarModule.forward through the kernels: autograd when anything needs a gradient."""
    weights = module_weights(module)
    if torch.is_grad_enabled() and (h.requires_grad or any(w.requires_grad for w in weights)):
        return StarFunction.apply(h, mask, settings, *weights)
    return star_forward(h, weights, mask, settings=settings)[0]


def fused_step(module: torch.nn.Module, h_t: torch.Tensor, state: StarState, *,
               settings: LaunchSettings = DEFAULT_LAUNCH) -> tuple[torch.Tensor, StarState]:
    """StarModule.step through the kernel (no autograd: decoding)."""
    return star_step(h_t, module_weights(module), state, settings=settings)
