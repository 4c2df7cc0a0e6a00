"""One decode step's attention for the row engine: each row attends over the first `lengths[row]` slots of its cache.

The engine's cache keeps a row per request, and a row's valid slots are always a prefix (full-attention layers: the
positions so far; sliding layers: the filled part of the ring). Done as two batched matrix products over the whole
cache, the step read every slot of every row, materialised float32 scores and masks, and ran cuBLAS's batched
products at four query rows per matrix (grouped-query attention), far from the memory bandwidth: on the H200 that
was most of a 1,024-row step. On CUDA a Triton kernel instead walks each (row, KV head) once over its valid prefix
with an online softmax (flash-decoding without the split: a step has rows x KV heads programs, enough to fill the
card), reading each key and value once for the query heads that share it. Elsewhere (CPU, no Triton, an unusual
head size) the reference below does the same arithmetic with PyTorch.
"""

from __future__ import annotations

import functools
from typing import Any

BLOCK = 64  # cache slots per loop iteration of the kernel


def reference(query: Any, key: Any, value: Any, lengths: Any, scale: float) -> Any:
    """query [rows, heads, 1, dim], key/value [rows, kv_heads, slots, dim], lengths [rows] -> [rows, 1, heads, dim]."""
    import torch

    rows, heads, _, dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    q = query.reshape(rows, kv_heads, heads // kv_heads, dim).to(key.dtype)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [rows, kv_heads, group, slots]
    valid = torch.arange(slots, device=key.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [rows, kv_heads, group, dim]
    return out.reshape(rows, 1, heads, dim)


def supported(query: Any, key: Any) -> bool:
    """Whether the Triton kernel takes these tensors (CUDA, Triton importable, a head size it can tile)."""
    if query.device.type != "cuda" or _kernel() is None:
        return False
    dim = query.shape[-1]
    return 16 <= dim <= 512 and dim & (dim - 1) == 0 and key.stride(-1) == 1 and query.stride(-1) == 1


def decode_attention(query: Any, key: Any, value: Any, lengths: Any, scale: float) -> Any:
    """Attention of one query per row over each row's first `lengths[row]` cache slots (see `reference`)."""
    if not supported(query, key):
        return reference(query, key, value, lengths, scale)
    return run_kernel(query, key, value, lengths, scale)


def run_kernel(query: Any, key: Any, value: Any, lengths: Any, scale: float) -> Any:
    import torch

    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out = torch.empty(rows, 1, heads, dim, device=query.device, dtype=value.dtype)
    _kernel()[(rows, kv_heads)](
        query,
        key,
        value,
        lengths,
        out,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        out.stride(0),
        out.stride(2),
        scale,
        GROUP=group,
        GROUP_PAD=max(16, 1 << (group - 1).bit_length()),
        DIM=dim,
        BLOCK=BLOCK,
        IEEE=key.dtype == torch.float32,
        num_warps=4 if dim <= 128 else 8,
        num_stages=2,
    )
    return out


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, built on first use (None where Triton cannot be imported)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rows_decode(
        Q,
        K,
        V,
        N,
        Out,
        sq_row,
        sq_head,
        sk_row,
        sk_head,
        sk_slot,
        sv_row,
        sv_head,
        sv_slot,
        so_row,
        so_head,
        scale,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        n = tl.load(N + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, DIM)
        heads = kv_head * GROUP + g
        is_head = g < GROUP
        q = tl.load(Q + row * sq_row + heads[:, None] * sq_head + d[None, :], mask=is_head[:, None], other=0.0)
        q = q.to(K.dtype.element_ty)
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
        k_rows = K + row * sk_row + kv_head * sk_head
        v_rows = V + row * sv_row + kv_head * sv_head
        for start in range(0, n, BLOCK):
            slot = start + tl.arange(0, BLOCK)
            valid = slot < n
            k = tl.load(k_rows + slot[:, None] * sk_slot + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:  # noqa: SIM108 (a constexpr branch: Triton compiles one side)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(valid[None, :], s * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, 1))
            rescale = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])
            total = total * rescale + tl.sum(p, 1)
            v = tl.load(v_rows + slot[:, None] * sv_slot + d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        out = acc / total[:, None]
        tl.store(
            Out + row * so_row + heads[:, None] * so_head + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=is_head[:, None],
        )

    return rows_decode
