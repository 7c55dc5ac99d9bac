"""Triton kernels for ``cross_modal_attention``: a flash-attention forward (online softmax in base 2,
fp32 accumulation, logsumexp out, optional ``gamma * out + residual`` epilogue) and a backward that
recomputes the probabilities from the logsumexp (delta pass, then one kernel over key blocks for dK
and dV, one over query blocks for dQ; no atomics, so results are bitwise reproducible).

Head dims are padded to powers of two (>= 16, the smallest ``tl.dot`` tile; >= 32 on a GPU) with masks;
Dv is processed in ``BLOCK_DV`` slices (one program per slice in the forward and for dV), so register
pressure does not grow with Dv. Any N, any strides (on a GPU q, k, v with a non-unit innermost stride
are copied first), float16 / bfloat16 (GPU) / float32 / float64. On a GPU the tiles come from the tables below
(``launch_specs()`` lists every launch; tests/test_gpu_compile.py compiles them for sm_80/sm_90): Dqk
up to 256 (fp32: 128), fp32 dots in "tf32x3".
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import _backends
from .. import attention as _attention_ops
from ._support import (GPU_DTYPES, acc_dtype, flag_variants, interpreting, launch_spec, poison_enabled, ptr_types,
                       sm_count)

Tensor = torch.Tensor
LOG2E = 1.4426950408889634
# kernels may read only constexpr globals
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    Q,  # pointer, (B,H,Nq,Dqk) any strides
    K,  # pointer, (B,H,Nk,Dqk) any strides
    V,  # pointer, (B,H,Nk,Dv) any strides
    Out,  # pointer, (B,H,Nq,Dv) any strides (residual's layout when fused)
    Lse,  # pointer, (B,H,Nq) contiguous, fp32 (fp64 for fp64 inputs), natural-log logsumexp
    Res,  # pointer, (B,H,Nq,Dv) any strides; read only when HAS_RES
    Gamma,  # pointer, (1,) in the inputs' dtype; read only when HAS_GAMMA
    sqb, sqh, sqn, sqd,  # q strides (elements)
    skb, skh, skn, skd,  # k strides
    svb, svh, svn, svd,  # v strides
    sob, soh, son, sod,  # out strides
    srb, srh, srn, srd,  # residual strides
    H, NQ, NK, DQK, DV,  # sizes
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    ACC: tl.constexpr,  # accumulation dtype (fp32, fp64 for fp64 inputs)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_GAMMA: tl.constexpr,
    PREC: tl.constexpr,  # tl.dot input_precision: "tf32x3" for fp32 on a GPU, else "ieee" (see _dot_precision)
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    pid_c = tl.program_id(2)  # which BLOCK_DV slice of the output this program owns
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_mask = offs_m < NQ
    d_mask = offs_d < DQK
    e_mask = offs_e < DV

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < NK
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC).to(ACC) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # every key block holds a valid key (Nk >= 1, blocks start below Nk), so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_e[None, :] * svd,
                    mask=n_mask[:, None] & e_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(ACC)
        m_i = m_new

    o = acc / l_i[:, None]
    # lse is the same for every Dv slice: slice 0 writes it
    if pid_c == 0:
        tl.store(Lse + bh.to(tl.int64) * NQ + offs_m, (m_i + tl.log2(l_i)) * _LN2, mask=m_mask)
    if HAS_GAMMA:
        o = o * tl.load(Gamma).to(ACC)
    if HAS_RES:
        r = tl.load(Res + b * srb + h * srh + offs_m[:, None] * srn + offs_e[None, :] * srd,
                    mask=m_mask[:, None] & e_mask[None, :], other=0.0)
        o = o + r.to(ACC)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_e[None, :] * sod,
             o.to(Out.dtype.element_ty), mask=m_mask[:, None] & e_mask[None, :])


@triton.jit
def _attn_bwd_delta_kernel(
    O,  # pointer, (B,H,Nq,Dv) any strides: the forward output
    DO,  # pointer, (B,H,Nq,Dv) any strides: grad of the output
    Delta,  # pointer, (B,H,Nq) contiguous, ACC dtype: rowsum(dO * O)
    sob, soh, son, sod,  # out strides
    sgb, sgh, sgn, sgd,  # grad_out strides
    H, NQ, DV,  # sizes
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < NQ
    total = tl.zeros([BLOCK_M], dtype=ACC)
    for start_e in range(0, DV, BLOCK_DV):
        offs_e = start_e + tl.arange(0, BLOCK_DV)
        mask = m_mask[:, None] & (offs_e < DV)[None, :]
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_e[None, :] * sod, mask=mask, other=0.0)
        do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgn + offs_e[None, :] * sgd, mask=mask, other=0.0)
        total += tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(Delta + bh.to(tl.int64) * NQ + offs_m, total, mask=m_mask)


@triton.jit
def _attn_bwd_kv_kernel(
    Q,  # pointer, (B,H,Nq,Dqk) any strides
    K,  # pointer, (B,H,Nk,Dqk) any strides
    V,  # pointer, (B,H,Nk,Dv) any strides
    DO,  # pointer, (B,H,Nq,Dv) any strides
    Lse,  # pointer, (B,H,Nq) contiguous, natural-log logsumexp from the forward
    Delta,  # pointer, (B,H,Nq) contiguous, rowsum(dO * O)
    DK,  # pointer, (B,H,Nk,Dqk) contiguous
    DV_,  # pointer, (B,H,Nk,Dv) contiguous
    sqb, sqh, sqn, sqd,  # q strides
    skb, skh, skn, skd,  # k strides
    svb, svh, svn, svd,  # v strides
    sgb, sgh, sgn, sgd,  # grad_out strides
    H, NQ, NK, DQK, DV,  # sizes
    scale, qk_scale,  # scale, and scale * log2(e)
    C0,  # first task index: tasks 0..N_SLICES-1 are dV slices, task N_SLICES is dK
    N_SLICES,  # ceil(Dv / BLOCK_DV)
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    task = tl.program_id(2) + C0
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < NK
    d_mask = offs_d < DQK
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    q_base = Q + b * sqb + h * sqh
    g_base = DO + b * sgb + h * sgh
    v_base = V + b * svb + h * svh
    row_base = bh.to(tl.int64) * NQ
    if task < N_SLICES:
        # dV[:, slice] = sum over query blocks of P^T dO[:, slice]
        offs_e = task * BLOCK_DV + tl.arange(0, BLOCK_DV)
        e_mask = offs_e < DV
        acc_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
        for start_m in range(0, NQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < NQ
            qt = tl.load(q_base + offs_m[None, :] * sqn + offs_d[:, None] * sqd,
                         mask=d_mask[:, None] & m_mask[None, :], other=0.0)
            lse2 = tl.load(Lse + row_base + offs_m, mask=m_mask, other=0.0).to(ACC) * _LOG2E
            st = tl.dot(k, qt, input_precision=PREC).to(ACC) * qk_scale
            # padded rows and columns must not reach the sums (exp2(0 - lse) could even overflow)
            pt = tl.where(n_mask[:, None] & m_mask[None, :], tl.exp2(st - lse2[None, :]), 0.0)
            do = tl.load(g_base + offs_m[:, None] * sgn + offs_e[None, :] * sgd,
                         mask=m_mask[:, None] & e_mask[None, :], other=0.0)
            acc_dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC).to(ACC)
        tl.store(DV_ + (bh.to(tl.int64) * NK + offs_n[:, None]) * DV + offs_e[None, :],
                 acc_dv.to(DV_.dtype.element_ty), mask=n_mask[:, None] & e_mask[None, :])
    else:
        # dK = scale * sum over query blocks of dS^T Q, dS = P * (dO V^T - delta)
        acc_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
        for start_m in range(0, NQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_mask = offs_m < NQ
            qt = tl.load(q_base + offs_m[None, :] * sqn + offs_d[:, None] * sqd,
                         mask=d_mask[:, None] & m_mask[None, :], other=0.0)
            lse2 = tl.load(Lse + row_base + offs_m, mask=m_mask, other=0.0).to(ACC) * _LOG2E
            delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
            st = tl.dot(k, qt, input_precision=PREC).to(ACC) * qk_scale
            pt = tl.where(n_mask[:, None] & m_mask[None, :], tl.exp2(st - lse2[None, :]), 0.0)
            dpt = tl.zeros([BLOCK_N, BLOCK_M], dtype=ACC)
            for start_e in range(0, DV, BLOCK_DV):
                offs_e = start_e + tl.arange(0, BLOCK_DV)
                e_mask = offs_e < DV
                v = tl.load(v_base + offs_n[:, None] * svn + offs_e[None, :] * svd,
                            mask=n_mask[:, None] & e_mask[None, :], other=0.0)
                dot_ = tl.load(g_base + offs_m[None, :] * sgn + offs_e[:, None] * sgd,
                               mask=e_mask[:, None] & m_mask[None, :], other=0.0)
                dpt += tl.dot(v, dot_, input_precision=PREC).to(ACC)
            dst = pt * (dpt - delta[None, :])
            acc_dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC).to(ACC)
        tl.store(DK + (bh.to(tl.int64) * NK + offs_n[:, None]) * DQK + offs_d[None, :],
                 (acc_dk * scale).to(DK.dtype.element_ty), mask=n_mask[:, None] & d_mask[None, :])


@triton.jit
def _attn_bwd_q_kernel(
    Q,  # pointer, (B,H,Nq,Dqk) any strides
    K,  # pointer, (B,H,Nk,Dqk) any strides
    V,  # pointer, (B,H,Nk,Dv) any strides
    DO,  # pointer, (B,H,Nq,Dv) any strides
    Lse,  # pointer, (B,H,Nq) contiguous, natural-log logsumexp from the forward
    Delta,  # pointer, (B,H,Nq) contiguous, rowsum(dO * O)
    DQ,  # pointer, (B,H,Nq,Dqk) contiguous
    sqb, sqh, sqn, sqd,  # q strides
    skb, skh, skn, skd,  # k strides
    svb, svh, svn, svd,  # v strides
    sgb, sgh, sgn, sgd,  # grad_out strides
    H, NQ, NK, DQK, DV,  # sizes
    scale, qk_scale,  # scale, and scale * log2(e)
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < NQ
    d_mask = offs_d < DQK
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    row_base = bh.to(tl.int64) * NQ
    lse2 = tl.load(Lse + row_base + offs_m, mask=m_mask, other=0.0).to(ACC) * _LOG2E
    delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    g_base = DO + b * sgb + h * sgh
    acc_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < NK
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC).to(ACC) * qk_scale
        p = tl.where(m_mask[:, None] & n_mask[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for start_e in range(0, DV, BLOCK_DV):
            offs_e = start_e + tl.arange(0, BLOCK_DV)
            e_mask = offs_e < DV
            do = tl.load(g_base + offs_m[:, None] * sgn + offs_e[None, :] * sgd,
                         mask=m_mask[:, None] & e_mask[None, :], other=0.0)
            vt = tl.load(v_base + offs_n[None, :] * svn + offs_e[:, None] * svd,
                         mask=e_mask[:, None] & n_mask[None, :], other=0.0)
            dp += tl.dot(do, vt, input_precision=PREC).to(ACC)
        ds = p * (dp - delta[:, None])
        acc_dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC).to(ACC)
    tl.store(DQ + (row_base + offs_m[:, None]) * DQK + offs_d[None, :],
             (acc_dq * scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------
# tile choices
# --------------------------------------------------------------------------------------------
class _Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    block_dv: int
    num_warps: int
    num_stages: int


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# GPU tile tables (launch_specs() compiles every tile they allow, so they are kept small). BLOCK_D: the
# head dim Dqk padded to a power of two, 32 to 256 (q, k and the dQ/dK accumulators are
# held whole). BLOCK_DV: the Dv slice, 64 or 128 (fp32: 64, its tiles take twice the registers and
# shared memory); narrower heads are masked. The forward halves BLOCK_M once when the grid would leave
# SMs idle (the streaming case: one image, one head); the backward keeps its tiles.
# fp32 (three tf32 passes per dot) stops at 128: its 256-wide backward tiles spill even at 16 rows.
GPU_HEAD_DIMS = (32, 64, 128, 256)


def _gpu_head_dims(wide: bool) -> Tuple[int, ...]:
    return GPU_HEAD_DIMS[:-1] if wide else GPU_HEAD_DIMS


def _gpu_block_d(dqk: int) -> int:
    return max(GPU_HEAD_DIMS[0], triton.next_power_of_2(dqk))


def _gpu_block_dv(dv: int, wide: bool) -> int:
    return 64 if wide or dv <= 64 else 128


def _gpu_block_dvs(wide: bool) -> Tuple[int, ...]:
    return (64,) if wide else (64, 128)


# The backward's Dv step (dV slices, and the Dv loops of dK and dQ): 64 (with 128 the dQ kernel's
# (64, Dv) dO tile next to its q, dQ and dP tiles spills on sm_80).
_GPU_BWD_BLOCK_DV = 64



def _fill_rows(block: int, rows: int, programs_per_block: int, device: torch.device) -> int:
    """Halves the forward's query tile once when the grid would leave multiprocessors idle."""
    if triton.cdiv(rows, block) * programs_per_block < sm_count(device):
        return block // 2
    return block


def _fwd_base(block_d: int, wide: bool) -> Tuple[int, int]:
    """(BLOCK_M before _fill_rows, BLOCK_N) of the forward kernel."""
    return (64 if block_d <= 128 and not wide else 32), (64 if block_d <= 64 else 32)


def _kv_base(block_d: int, wide: bool) -> int:
    """BLOCK_N of the dK/dV kernel and of the dQ kernel's key steps (fp32 256-wide heads: 16)."""
    if wide:
        return 16 if block_d > 128 else 32
    return 64 if block_d <= 64 else 32


def _q_base(block_d: int, wide: bool) -> int:
    """BLOCK_M of the dQ kernel: it holds q and its (BLOCK_M, BLOCK_D) accumulator (fp32: 16 rows)."""
    return 16 if wide else (32 if block_d > 128 else 64)


def _kv_step(wide: bool) -> int:
    """Query rows per step of the dK/dV kernel (fp32: 16, its tf32x3 dots triple the operand tiles)."""
    return 16 if wide else 32


def _gpu_warps(wide: bool, block_d: int) -> int:
    """Warps per program: fp32 tiles (three tf32 tensor-core passes per dot) and 256-wide heads (the
    backward holds (BLOCK_N, 256) k and accumulator tiles) are spread over 8 warps so that they fit in
    255 registers per thread; the others take 4."""
    return 8 if wide or block_d > 128 else 4


def _check_head_dim(q: Tensor, dqk: int) -> None:
    """Raises for head dims beyond the GPU tile table of q's dtype (no compiled tile holds them)."""
    limit = _gpu_head_dims(q.element_size() > 2)[-1]
    if _pow2(dqk) > limit:
        raise ValueError(f"the triton attention kernels take Dqk <= {limit} for {q.dtype} on a GPU, got {dqk}; "
                         "use backend='cuda' or 'reference'")


def head_dim_reasons(q: Tensor, k: Optional[Tensor] = None, v: Optional[Tensor] = None) -> List[str]:
    """Dispatch's view of ``_check_head_dim``: why these kernels cannot take q (B,H,N,Dqk) on a GPU, so that
    automatic selection falls back (the interpreter has no tile table, so no limit there)."""
    if interpreting(q):
        return []
    limit = _gpu_head_dims(q.element_size() > 2)[-1]
    dqk = q.shape[-1]
    return [f"Dqk {dqk} exceeds the {limit} of its GPU tiles for {q.dtype}"] if _pow2(dqk) > limit else []


def _fwd_tiles(q: Tensor, nq: int, dqk: int, dv: int, bh: int) -> _Tiles:
    block_d, dv_p = _pow2(dqk), _pow2(dv)
    if interpreting(q):
        # one config: big tiles (interpreter cost grows with the program count), Dv still sliced
        return _Tiles(64, 64, block_d, min(dv_p, 128), 4, 1)
    _check_head_dim(q, dqk)
    block_d = _gpu_block_d(dqk)
    wide = q.element_size() > 2  # fp32/fp64 tiles take twice the registers and shared memory
    block_dv = _gpu_block_dv(dv, wide)
    block_m, block_n = _fwd_base(block_d, wide)
    block_m = _fill_rows(block_m, nq, bh * triton.cdiv(dv, block_dv), q.device)
    return _Tiles(block_m, block_n, block_d, block_dv, _gpu_warps(wide, block_d), 1 if wide else 2)


def _bwd_tiles(q: Tensor, dqk: int, dv: int) -> _Tiles:
    """Tiles of the backward kernels: block_n keys held per program in the dK/dV kernel and per step in
    the dQ kernel; block_m the query rows per step in the dK/dV kernel (the dQ kernel picks its own)."""
    block_d, dv_p = _pow2(dqk), _pow2(dv)
    if interpreting(q):
        return _Tiles(64, 64, block_d, min(dv_p, 128), 4, 1)
    _check_head_dim(q, dqk)
    block_d = _gpu_block_d(dqk)
    wide = q.element_size() > 2
    return _Tiles(_kv_step(wide), _kv_base(block_d, wide), block_d, _GPU_BWD_BLOCK_DV,
                  _gpu_warps(wide, block_d), 1 if wide else 2)


def _dot_precision(q: Tensor) -> str:
    """tl.dot's input_precision: fp32 on a GPU runs "tf32x3" (three tensor-core passes, ~fp32 accuracy:
    relative error ~1e-6); "ieee" there is a CUDA-core FMA dot whose operand copies need more than 255
    registers per thread at these tiles and spill. fp16/bf16 ignore it; fp64 and the interpreter take "ieee"."""
    return "tf32x3" if q.dtype == torch.float32 and not interpreting(q) else "ieee"


# The delta kernel's Dv step on a GPU: it only sums rows, so a narrow step costs nothing.
_GPU_DELTA_BLOCK_DV = 64


def _delta_block_dv(q: Tensor, dv: int) -> int:
    """BLOCK_DV of the delta kernel (a row sum over Dv slices)."""
    return min(_pow2(dv), 128) if interpreting(q) else _GPU_DELTA_BLOCK_DV


def _unit_inner(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` with a unit innermost stride (copied when it has none): Triton specializes a stride of 1
    into a constant, which vectorizes the tile loads; with a runtime inner stride every element needs
    its own 64-bit address and the fp32 tiles spill. launch_specs() compiles the unit-stride launches."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def forward_epilogue(q: Tensor, k: Tensor, v: Tensor, scale: float, residual: Optional[Tensor],
                     gamma: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale) v`` (times ``gamma``, plus ``residual``), and the row logsumexp.

    q (B,H,Nq,Dqk), k (B,H,Nk,Dqk), v (B,H,Nk,Dv), residual (B,H,Nq,Dv) any strides or None, gamma a
    one-element tensor in q's dtype or None -> (out (B,H,Nq,Dv) in q's dtype, laid out like a dense
    ``residual`` when given, else contiguous; lse (B,H,Nq) fp32, fp64 for fp64 inputs).
    """
    B, H, Nq, Dqk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    if not interpreting(q):
        # the residual (and so the output, laid out like it) keeps its layout: DaGAN's is an NCHW map seen
        # as (B,1,N,C) tokens, unit stride along N; launch_specs() compiles both unit-stride layouts
        q, k, v = (_unit_inner(t) for t in (q, k, v))
    out = _attention_ops.epilogue_output(q, v, residual)
    lse = q.new_empty((B, H, Nq), dtype=_lse_dtype(q.dtype))
    if poison_enabled():
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    if B * H == 0 or Nq == 0:
        return out, lse
    t = _fwd_tiles(q, Nq, Dqk, Dv, B * H)
    res = residual if residual is not None else out
    # unused without a residual; a unit last stride keeps the launch the one launch_specs() compiles
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 1)
    grid = (triton.cdiv(Nq, t.block_m), B * H, triton.cdiv(Dv, t.block_dv))
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, res, gamma if gamma is not None else out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *res_strides,
        H, Nq, Nk, Dqk, Dv, scale * LOG2E,
        ACC=acc_dtype(q.dtype), BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, BLOCK_DV=t.block_dv,
        HAS_RES=residual is not None, HAS_GAMMA=gamma is not None, PREC=_dot_precision(q),
        num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out, lse


def forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Backend interface: (out (B,H,Nq,Dv) contiguous, lse (B,H,Nq)) for q, k, v as in ``forward_epilogue``."""
    return forward_epilogue(q, k, v, scale, None, None)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
             output_mask: Sequence[bool] = (True, True, True)) -> Tuple[Tensor, Tensor, Tensor]:
    """Backend interface: (dq (B,H,Nq,Dqk), dk (B,H,Nk,Dqk), dv (B,H,Nk,Dv)), each contiguous in its
    input's dtype, recomputing P from ``lse``; gradients not in ``output_mask`` are empty (0,) tensors."""
    B, H, Nq, Dqk = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    want_q, want_k, want_v = (bool(x) for x in output_mask)
    dq = q.new_empty(q.shape) if want_q else q.new_empty((0,))
    dk = k.new_empty(k.shape) if want_k else k.new_empty((0,))
    dv = v.new_empty(v.shape) if want_v else v.new_empty((0,))
    if poison_enabled():
        for g in (dq, dk, dv):
            g.fill_(float("nan"))
    if B * H == 0 or not (want_q or want_k or want_v):
        return dq, dk, dv
    if Nq == 0:  # no query reaches any key: the key-side gradients are exactly zero
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    lse = lse.contiguous()
    if not interpreting(q):
        q, k, v, out, grad_out = (_unit_inner(t) for t in (q, k, v, out, grad_out))
    t = _bwd_tiles(q, Dqk, Dv)
    acc = acc_dtype(q.dtype)
    common = dict(ACC=acc, BLOCK_D=t.block_d, BLOCK_DV=t.block_dv, PREC=_dot_precision(q), num_warps=t.num_warps,
                  num_stages=t.num_stages)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    delta = None
    if want_q or want_k:
        delta = torch.empty((B, H, Nq), device=q.device, dtype=lse.dtype)
        block = 64
        _attn_bwd_delta_kernel[(triton.cdiv(Nq, block), B * H)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), H, Nq, Dv,
            ACC=acc, BLOCK_M=block, BLOCK_DV=_delta_block_dv(q, Dv), num_warps=4)
    if want_k or want_v:
        n_slices = triton.cdiv(Dv, t.block_dv)
        first = 0 if want_v else n_slices
        tasks = (n_slices if want_v else 0) + (1 if want_k else 0)
        block_n = t.block_n
        _attn_bwd_kv_kernel[(triton.cdiv(Nk, block_n), B * H, tasks)](
            q, k, v, grad_out, lse, delta if delta is not None else lse, dk if want_k else k,
            dv if want_v else v, *strides, H, Nq, Nk, Dqk, Dv, scale, scale * LOG2E, first, n_slices,
            BLOCK_M=t.block_m, BLOCK_N=block_n, **common)
    if want_q:
        block_m = 64 if interpreting(q) else _q_base(t.block_d, q.element_size() > 2)
        _attn_bwd_q_kernel[(triton.cdiv(Nq, block_m), B * H)](
            q, k, v, grad_out, lse, delta, dq, *strides, H, Nq, Nk, Dqk, Dv, scale, scale * LOG2E,
            BLOCK_M=block_m, BLOCK_N=t.block_n, **common)
    return dq, dk, dv


def launch_specs():
    """Every kernel configuration the attention launchers can launch on a GPU: for each GPU dtype, each
    head-dim tile and Dv slice (and the forward's _fill_rows choice: base tile or halved), with the fused
    epilogue on; the forward without residual / gamma once per dtype (each code path compiles)."""
    specs = []
    qkv = ("Q", "K", "V")
    for dtype in GPU_DTYPES:
        wide = dtype not in (torch.float16, torch.bfloat16)
        stages = 1 if wide else 2
        acc = acc_dtype(dtype)
        lse = {"Lse": "fp32", "Delta": "fp32"}
        specs.append(launch_spec(_attn_bwd_delta_kernel, dtype, ptr_types(("O", "DO", "Delta"), dtype, lse),
                                 dict(ACC=acc, BLOCK_M=64, BLOCK_DV=_GPU_DELTA_BLOCK_DV), 4, units=("sod", "sgd")))
        for block_d in _gpu_head_dims(wide):
            base_m, block_n = _fwd_base(block_d, wide)
            kv_n = _kv_base(block_d, wide)
            q_m = _q_base(block_d, wide)
            warps = _gpu_warps(wide, block_d)
            for block_dv in sorted(set(_gpu_block_dvs(wide)) | {_GPU_BWD_BLOCK_DV}):
                tiles = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, PREC="tf32x3" if dtype == torch.float32 else "ieee")
                fwd_ptrs = ptr_types(qkv + ("Out", "Lse", "Res", "Gamma"), dtype, lse)
                for block_m in (base_m, base_m // 2) if block_dv in _gpu_block_dvs(wide) else ():
                    flags = flag_variants(("HAS_RES", "HAS_GAMMA"))
                    first = block_d == 32 and block_dv == _gpu_block_dvs(wide)[-1] and block_m == base_m
                    for f in flags if first else flags[:1]:
                        # output and residual with unit feature stride, and (with a residual) the NCHW
                        # token view's layout: unit stride along the rows
                        for out_units in (("sod", "srd"), ("son", "srn")) if f["HAS_RES"] else (("sod", "srd"),):
                            specs.append(launch_spec(_attn_fwd_kernel, dtype, fwd_ptrs,
                                                     dict(ACC=acc, BLOCK_M=block_m, BLOCK_N=block_n, **tiles, **f),
                                                     warps, stages, floats=("qk_scale",),
                                                     units=("sqd", "skd", "svd", *out_units)))
                bwd_ptrs = ptr_types(qkv + ("DO", "Lse", "Delta", "DK", "DV_", "DQ"), dtype, lse)
                if block_dv != _GPU_BWD_BLOCK_DV:
                    continue
                specs.append(launch_spec(_attn_bwd_kv_kernel, dtype,
                                         {k: v for k, v in bwd_ptrs.items() if k != "DQ"},
                                         dict(ACC=acc, BLOCK_M=_kv_step(wide), BLOCK_N=kv_n, **tiles), warps, stages,
                                         floats=("scale", "qk_scale"), units=("sqd", "skd", "svd", "sgd")))
                specs.append(launch_spec(_attn_bwd_q_kernel, dtype,
                                         {k: v for k, v in bwd_ptrs.items() if k not in ("DK", "DV_")},
                                         dict(ACC=acc, BLOCK_M=q_m, BLOCK_N=kv_n, **tiles), warps, stages,
                                         floats=("scale", "qk_scale"), units=("sqd", "skd", "svd", "sgd")))
    return specs


_backends.get_backend("triton").register(_attention_ops.OP, forward, backward,
                                         not_supported_reasons=head_dim_reasons)
_attention_ops.register_epilogue("triton", forward_epilogue)
