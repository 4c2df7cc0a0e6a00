"""The decode step's attention over each row's valid cache prefix: the PyTorch reference and the Triton kernel (run by
Triton's interpreter on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mathwizard import decode_attention, decoding

torch = pytest.importorskip("torch")


def _by_hand(query, key, value, lengths, scale):
    """Row by row and head by head, each query head over its KV head's first n slots."""
    rows, heads, _, dim = query.shape
    group = heads // key.shape[1]
    out = torch.zeros(rows, 1, heads, dim)
    for r in range(rows):
        n = int(lengths[r])
        for h in range(heads):
            k, v = key[r, h // group, :n].float(), value[r, h // group, :n].float()
            weights = (query[r, h, 0].float() @ k.T * scale).softmax(-1)
            out[r, 0, h] = weights @ v
    return out


def _inputs(rows=4, heads=8, kv_heads=2, slots=150, dim=32, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(rows, 1, heads, dim, generator=generator).to(dtype).transpose(1, 2)  # as attention makes it
    key = torch.randn(rows, kv_heads, slots, dim, generator=generator).to(dtype)
    value = torch.randn(rows, kv_heads, slots, dim, generator=generator).to(dtype)
    return query, key, value


def test_the_reference_attends_over_each_rows_prefix_only() -> None:
    query, key, value = _inputs()
    lengths = torch.tensor([1, 64, 65, 150], dtype=torch.int32)
    expected = _by_hand(query, key, value, lengths, 0.125)
    assert torch.allclose(decode_attention.reference(query, key, value, lengths, 0.125), expected, atol=1e-5)


def test_decode_lengths_are_the_slots_the_masks_allowed() -> None:
    """Full attention: slots 0..p; the sliding ring: slots 0..p until it wraps, then all `window` of them."""
    positions = torch.tensor([0, 5, 7, 8, 30, 63])
    length, window = 64, 8
    got = decoding.decode_lengths(positions, length, window)
    for i, p in enumerate(positions.tolist()):
        full = [s for s in range(length + 1) if s <= p and s < length]
        ring = [r for r in range(window + 1) if (r <= p or p >= window - 1) and r < window]
        assert full == list(range(int(got["full_attention"][i])))
        assert ring == list(range(int(got["sliding_attention"][i])))


KERNEL_CASES = [  # (dtype, heads, KV heads, head size): E2B's 8/2 x 256, the tiny model's 2/1 x 32, a 16-bit path
    ("float32", 8, 2, 256),
    ("float32", 2, 1, 32),
    ("float16", 8, 2, 64),
]


def test_the_triton_kernel_equals_the_reference() -> None:
    """The kernel itself, run by Triton's CPU interpreter (bf16 products are not emulated there: float16 stands in
    for the 16-bit path), over prefixes of 1 slot, exactly one and just over one block, and the whole cache, with
    NaN in every slot past a row's prefix (it must never be read). One interpreter process for every case."""
    pytest.importorskip("triton")
    block = decode_attention.BLOCK
    script = textwrap.dedent(
        f"""
        import json, torch
        from mathwizard import decode_attention
        from tests.test_decode_attention import KERNEL_CASES, _inputs
        for dtype, heads, kv_heads, dim in KERNEL_CASES:
            query, key, value = _inputs(heads=heads, kv_heads=kv_heads, slots={2 * block + 7}, dim=dim,
                                        dtype=getattr(torch, dtype))
            lengths = torch.tensor([1, {block}, {block + 1}, {2 * block + 7}], dtype=torch.int32)
            want = decode_attention.reference(query, key, value, lengths, dim**-0.5)
            for row, n in enumerate(lengths.tolist()):  # past a row's prefix (stale slots): never read
                key[row, :, n:] = float("nan")
                value[row, :, n:] = float("nan")
            got = decode_attention.run_kernel(query, key, value, lengths, dim**-0.5)
            print(json.dumps({{"case": [dtype, heads, kv_heads, dim], "shape": list(got.shape),
                               "dtype": str(got.dtype), "error": (got.float() - want.float()).abs().max().item()}}))
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [tuple(r["case"]) for r in results] == KERNEL_CASES
    for (dtype, heads, _, dim), result in zip(KERNEL_CASES, results, strict=True):
        assert result["shape"] == [4, 1, heads, dim] and result["dtype"] == f"torch.{dtype}"
        assert result["error"] < (1e-5 if dtype == "float32" else 2e-3), result


def test_the_kernel_is_used_only_where_it_can_run() -> None:
    query, key, _ = _inputs()
    assert not decode_attention.supported(query, key)  # a CPU tensor: the reference
