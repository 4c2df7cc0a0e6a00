"""AltUp's prediction mix (gemma-3n's `Gemma3nTextAltUp.predict`): each token's S streams mixed by its own S x S matrix.

For hidden states x [S, B, T, D] and per-token coefficients P [B, T, S, S] (`prediction_coefs(...)` reshaped, before
the model's transpose), the model computes out[j] = x[j] + sum_i P[j, i] * x[i] as `torch.matmul` of permuted
tensors: B*T batched [D, S] x [S, S] products, which on the H200 run on slow 16x16 cutlass kernels (~530 us a call at
B*T = 5,200, D = 2,048) plus permute copies, for work that is one memory pass (~50 us). On CUDA a Triton kernel
instead reads x once and writes the output once, accumulating in float32; the backward reads x and the incoming
gradient once, writing dx and each token's dP (one program per token summing over d in a fixed order: deterministic,
no atomics). Timed once on the H200 with a scratch script that was not kept (bf16, B*T = 5,200, D = 2,048): forward
~45 us and backward ~66 us of GPU time, against ~1,050 us for the model's formulation forward and backward; the
figures this repository stands by are `benchmarks/gpu/bench_sft.py`'s, with and without `model.kernels`. Elsewhere
(CPU, no Triton, another dtype) `reference` is the model's own formulation.
"""

from __future__ import annotations

import functools
from typing import Any

FORWARD_BLOCK_D = 2048  # hidden-size lanes per forward program (one program per token and block)
BACKWARD_BLOCK_D = 1024  # hidden-size lanes per iteration of the backward's per-token loop


def reference(x: Any, coefs: Any) -> Any:
    """x [S, B, T, D], coefs [B, T, S, S] -> [S, B, T, D]: the model's matmul, undone permute, `+ x`, in x's dtype."""
    import torch

    predictions = torch.matmul(x.permute(1, 2, 3, 0), coefs.permute(0, 1, 3, 2))
    predictions = predictions.permute(3, 0, 1, 2)
    predictions += x
    return predictions.contiguous().type_as(x)


def supported(x: Any) -> bool:
    """Whether the Triton kernels take this tensor (CUDA, Triton importable, a float dtype they load)."""
    import torch

    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return _kernel() is not None


def altup_mix(x: Any, coefs: Any) -> Any:
    """out[j] = x[j] + sum_i coefs[..., j, i] * x[i] per token (see `reference`); differentiable in both."""
    if not supported(x):
        return reference(x, coefs)
    return run_kernel(x, coefs)


def run_kernel(x: Any, coefs: Any) -> Any:
    """The Triton path whatever the device (CPU tensors need TRITON_INTERPRET=1): an autograd Function where a
    gradient is wanted, else the forward kernel alone (no autograd bookkeeping on the host, as in decoding)."""
    import torch

    if torch.is_grad_enabled() and (x.requires_grad or coefs.requires_grad):
        return _function().apply(x, coefs)
    return _forward(x.contiguous(), coefs.contiguous())


def _forward(x: Any, coefs: Any) -> Any:
    """The forward kernel on contiguous x and coefs."""
    import torch

    out = torch.empty_like(x)
    _launch(x, coefs, transpose=False, out=out, other=None, grad_coefs=None)
    return out


@functools.cache
def _function() -> Any:
    """The autograd Function, built on first use (importing this module imports no torch)."""
    import torch

    class AltUpMix(torch.autograd.Function):
        """The mix with the Triton kernel forward and backward; saves only x and coefs."""

        @staticmethod
        def forward(ctx: Any, x: Any, coefs: Any) -> Any:
            x, coefs = x.contiguous(), coefs.contiguous()
            ctx.save_for_backward(x, coefs)
            return _forward(x, coefs)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x, coefs = ctx.saved_tensors
            want_x, want_coefs = ctx.needs_input_grad
            grad_x = torch.empty_like(x) if want_x else None
            grad_coefs = torch.empty_like(coefs) if want_coefs else None
            if want_x or want_coefs:
                other = x if want_coefs else None
                _launch(grad.contiguous(), coefs, transpose=True, out=grad_x, other=other, grad_coefs=grad_coefs)
            return grad_x, grad_coefs

    return AltUpMix


def _launch(mixed: Any, coefs: Any, transpose: bool, out: Any, other: Any, grad_coefs: Any) -> None:
    """One launch of `_kernel` over contiguous [S, B, T, D] tensors and [B, T, S, S] coefficients.

    Mixes `mixed` into `out` by coefs (transposed for the backward's dx) when `out` is given; sums
    grad_coefs[..., o, k] = sum_d mixed[o] * other[k] when `grad_coefs` is given (then one program per token).
    """
    streams, batch, length, dim = mixed.shape
    tokens = batch * length
    if tokens == 0 or dim == 0:
        if grad_coefs is not None:
            grad_coefs.zero_()
        return
    block_d = min(BACKWARD_BLOCK_D if grad_coefs is not None else FORWARD_BLOCK_D, 1 << (dim - 1).bit_length())
    span = -(-dim // block_d) * block_d if grad_coefs is not None else block_d  # lanes per program
    # Enough warps that a row of the tile is two 16-byte loads a thread: the S rows stay within each thread, so
    # the sums over streams need no exchange between threads (nor between warps, which costs far more).
    warps = max(1, min(4, block_d * mixed.element_size() // (32 * 32)))
    row, col = (1, streams) if transpose else (streams, 1)  # coefs strides for (output stream, input stream)
    _kernel()[(tokens, -(-dim // span))](
        mixed,
        coefs,
        mixed if out is None else out,
        mixed if other is None else other,
        mixed if grad_coefs is None else grad_coefs,
        dim,
        tokens * dim,
        row,
        col,
        span,
        S=streams,
        S_PAD=1 << (streams - 1).bit_length(),
        BLOCK_D=block_d,
        MIX=out is not None,
        GRAD_COEFS=grad_coefs is not None,
        num_warps=warps,
    )


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, built on first use (None where Triton cannot be imported).

    A program takes one token's S streams over lanes [axis 1 * span, + span) of d, BLOCK_D at a time, as an
    [S_PAD, BLOCK_D] tile of `Mixed` ([S, N, D]). MIX: Out[o] = Mixed[o] + sum_k C[o, k] * Mixed[k], with
    C[o, k] = Coefs[token, o * row + k * col] (the forward: P as is; the backward's dx: P transposed, Mixed being the
    gradient). GRAD_COEFS: GradCoefs[token, o, k] = sum_d Mixed[o] * Other[k] (the backward's dP: Mixed the gradient,
    Other x, span all of D). Sums are float32; the loops over output streams are unrolled, on 2-D tiles of one layout.
    """
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def altup_mix_kernel(
        Mixed,
        Coefs,
        Out,
        Other,
        GradCoefs,
        dim,
        stream_stride,
        row,
        col,
        span,
        S: tl.constexpr,
        S_PAD: tl.constexpr,
        BLOCK_D: tl.constexpr,
        MIX: tl.constexpr,
        GRAD_COEFS: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        start = tl.program_id(1) * span
        s = tl.arange(0, S_PAD)[:, None]  # the tile's rows: streams
        outs = tl.arange(0, S_PAD)[None, :]  # dP's output streams, as columns
        in_s = s < S
        rows = token * dim + s.to(tl.int64) * stream_stride
        coefs = Coefs + token * S * S
        dp = tl.zeros([S_PAD, S_PAD], tl.float32)  # [k, o]
        for d0 in range(start, start + span, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)[None, :]
            mask = in_s & (d < dim)
            m = tl.load(Mixed + rows + d, mask=mask, other=0.0).to(tl.float32)
            if MIX:
                out = m
                for o in tl.static_range(S):
                    c = tl.load(coefs + o * row + s * col, mask=in_s, other=0.0).to(tl.float32)  # [S_PAD, 1]: C[o, k]
                    out += tl.where(s == o, tl.sum(c * m, axis=0, keep_dims=True), 0.0)
                tl.store(Out + rows + d, out.to(Out.dtype.element_ty), mask=mask)
            if GRAD_COEFS:
                y = tl.load(Other + rows + d, mask=mask, other=0.0).to(tl.float32)
                for o in tl.static_range(S):
                    m_o = tl.sum(tl.where(s == o, m, 0.0), axis=0, keep_dims=True)  # [1, BLOCK_D]: row o
                    dp += tl.where(outs == o, tl.sum(m_o * y, axis=1, keep_dims=True), 0.0)
        if GRAD_COEFS:
            tl.store(
                GradCoefs + token * S * S + outs * S + s, dp.to(GradCoefs.dtype.element_ty), mask=in_s & (outs < S)
            )

    return altup_mix_kernel
