"""AltUp's prediction mix: the PyTorch reference (the model's own formulation) and the Triton kernels forward and
backward (run by Triton's interpreter on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mathwizard import altup_mix

torch = pytest.importorskip("torch")


def _inputs(streams=4, batch=1, length=7, dim=64, dtype=torch.float32, contiguous=True):
    """x [S, B, T, D], coefs [B, T, S, S] (not symmetric: a swapped i/j shows) and an upstream gradient like x."""
    generator = torch.Generator().manual_seed(0)
    if contiguous:
        x = torch.randn(streams, batch, length, dim, generator=generator)
    else:  # the same shape over a [B, S, T, D] storage
        x = torch.randn(batch, streams, length, dim, generator=generator).transpose(0, 1)
    coefs = torch.randn(batch, length, streams, streams, generator=generator) * 0.5
    grad = torch.randn(streams, batch, length, dim, generator=generator)
    return x.to(dtype), coefs.to(dtype), grad.to(dtype)


def test_the_reference_is_the_mix_by_hand() -> None:
    """predictions[j, b, t] = x[j, b, t] + sum_i coefs[b, t, j, i] * x[i, b, t], as gemma-3n's predict computes it."""
    x, coefs, _ = _inputs(streams=3, batch=2, length=3, dim=5)
    expected = torch.zeros_like(x)
    for b in range(2):
        for t in range(3):
            for j in range(3):
                expected[j, b, t] = x[j, b, t] + sum(coefs[b, t, j, i] * x[i, b, t] for i in range(3))
    got = altup_mix.reference(x, coefs)
    assert got.is_contiguous() and got.dtype == x.dtype
    assert torch.allclose(got, expected, atol=1e-6)


def test_on_the_cpu_altup_mix_is_the_reference() -> None:
    x, coefs, grad = _inputs()
    assert not altup_mix.supported(x)  # a CPU tensor: the reference, gradients by PyTorch
    x.requires_grad_()
    coefs.requires_grad_()
    got = altup_mix.altup_mix(x, coefs)
    assert torch.equal(got, altup_mix.reference(x, coefs))
    got.backward(grad)
    assert x.grad is not None and coefs.grad is not None


KERNEL_CASES = [  # (dtype, S, B, T, D, x contiguous): E2B's 4 x 2048, D past a block, the tiny model's 2 x 64, odd S
    ("float32", 4, 1, 7, 2048, True),
    ("float32", 4, 2, 3, 2500, False),
    ("float32", 2, 1, 5, 64, True),
    ("float32", 3, 1, 5, 100, True),
    ("float16", 4, 1, 7, 300, True),
    ("float16", 2, 3, 2, 100, True),
]


def test_the_triton_kernels_equal_the_reference_and_its_gradients() -> None:
    """Forward, dx and dcoefs of the kernels against the reference's autograd, run by Triton's CPU interpreter (bf16
    products are not emulated there: float16 stands in for the 16-bit path). D = 2,500 leaves a partial block in both
    passes (forward 2 programs a token, backward 3 loop iterations). Per case also the error that a kernel which
    swapped i and j, or dropped the `+ x`, would have had: it must be far above the tolerance, or the comparison would
    not catch those. One interpreter process for every case."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import json, torch
        from mathwizard import altup_mix
        from tests.test_altup_mix import KERNEL_CASES, _inputs

        def error(got, want):
            return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()

        for dtype, streams, batch, length, dim, contiguous in KERNEL_CASES:
            x, coefs, grad = _inputs(streams, batch, length, dim, getattr(torch, dtype), contiguous)
            x.requires_grad_()
            coefs.requires_grad_()
            want = altup_mix.reference(x, coefs)
            want_dx, want_dcoefs = torch.autograd.grad(want, (x, coefs), grad)
            got = altup_mix.run_kernel(x, coefs)
            dx, dcoefs = torch.autograd.grad(got, (x, coefs), grad)
            only_dx, only_dcoefs = dx, dcoefs
            if dim <= 300:  # one gradient wanted: the kernel's other half skipped
                (only_dx,) = torch.autograd.grad(altup_mix.run_kernel(x, coefs.detach()), (x,), grad)
                (only_dcoefs,) = torch.autograd.grad(altup_mix.run_kernel(x.detach(), coefs), (coefs,), grad)
            plain = altup_mix.run_kernel(x.detach(), coefs.detach())  # no gradient wanted: the kernel alone
            swapped = altup_mix.reference(x, coefs.transpose(-1, -2))
            print(json.dumps({
                "case": [dtype, streams, batch, length, dim, contiguous],
                "shape": list(got.shape), "contiguous": got.is_contiguous(),
                "dtypes": [str(got.dtype), str(dx.dtype), str(dcoefs.dtype)],
                "out": error(got, want), "plain": error(plain, want),
                "dx": error(dx, want_dx), "dcoefs": error(dcoefs, want_dcoefs),
                "only_dx": error(only_dx, want_dx), "only_dcoefs": error(only_dcoefs, want_dcoefs),
                "if_swapped": error(got, swapped), "if_no_skip": error(got, want - x),
            }))
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [tuple(r["case"]) for r in results] == KERNEL_CASES
    for (dtype, streams, batch, length, dim, _), result in zip(KERNEL_CASES, results, strict=True):
        tolerance = 1e-5 if dtype == "float32" else 3e-3
        assert result["shape"] == [streams, batch, length, dim] and result["contiguous"], result
        assert result["dtypes"] == [f"torch.{dtype}"] * 3, result
        for key in ("out", "plain", "dx", "dcoefs", "only_dx", "only_dcoefs"):
            assert result[key] < tolerance, (key, result)
        assert min(result["if_swapped"], result["if_no_skip"]) > 100 * tolerance, result
