"""Triton fused-LM-head kernels (fastdpo/triton/linear.py) at the op level.

Without a GPU they run under TRITON_INTERPRET=1 (set by tests/conftest.py) on CPU tensors, with
the interpreter corrected to the GPU's bf16 semantics (fastdpo/triton/_interpreter.py); the GPU
build is checked by compiling the kernels ahead of time for sm_90 (tensor cores, no spills)
without a GPU.
"""

import math

import pytest
import torch

from fastdpo import ops, rows
from tolerance import assert_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]




def make(N, H, V, dtype, *, seed=0, ignore_frac=0.2, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    y[torch.rand(N, generator=g) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(w), cast(b), y.to(device)


def ref(h, w, b, y, ignore_index, temperature, scale, cap, vocab_start, vocab_total, dtype):
    """logp / lse / entropy of the shard [vocab_start, vocab_start + V) from materialised logits,
    computed in ``dtype`` (float64: the oracle; the input dtype: the eager baseline)."""
    z = h.to(dtype) @ w.to(dtype).t()
    if b is not None:
        z = z + b.to(dtype)
    z = z * scale
    if cap:
        z = cap * torch.tanh(z / cap)
    # eager: log_softmax of z / T in its own precision, the rest in float64
    z = z / temperature
    if dtype != torch.float64:
        z = z - z.amax(-1, keepdim=True)  # as log_softmax does, before leaving ``dtype``
        z = z.double()
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    ent = lse - torch.where(p > 0, p * z, 0.0).sum(-1)
    active = y != ignore_index
    local = y - vocab_start
    inside = (local >= 0) & (local < w.shape[0])
    zl = torch.where(inside, z.gather(-1, local.clamp(0, w.shape[0] - 1)[:, None])[:, 0], 0.0)
    valid = (y >= 0) & (y < vocab_total)
    logp = torch.where(active, torch.where(valid, zl - lse, float("nan")), 0.0)
    return logp, torch.where(active, lse, 0.0), torch.where(active, ent, 0.0)


def fwd(TL, h, w, b, y, args, with_entropy=True):
    """(logp, lse, entropy, row_max, log_sum) of the op."""
    logp, rm, ls, ent = TL.linear_logps_fwd(h, w, b, y, *args, with_entropy)
    for t in (logp, rm, ls):
        assert t.dtype == torch.float32 and t.shape == y.shape
    return logp, rows.lse(rm.double(), ls.double(), args[1]), ent, rm, ls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,V", [(1, 16, 32), (37, 24, 101), (20, 48, 3)])
def test_forward_matches_reference(TL, device, dtype, N, H, V):
    h, w, b, y = make(N, H, V, dtype, device=device)
    args = (-100, 0.9, 0.7, 4.0, 0, V)
    logp, lse, ent, rm, ls = fwd(TL, h, w, b, y, args)
    want = ref(h, w, b, y, *args, torch.float64)
    eager = ref(h, w, b, y, *args, dtype)
    for name, a, r, e in zip(("logp", "lse", "entropy"), (logp, lse, ent), want, eager):
        assert_rule(a, r, e, dtype, what=name)
    assert bool(((ls >= 0) & (ls <= math.log(V) + 1e-6)).all())


def test_vocab_shard_and_bad_labels(TL, device):
    h, w, b, y = make(12, 16, 40, torch.float32, device=device, ignore_frac=0.0)
    y = torch.tensor([0, 99, 100, 139, 140, -3, 120, 101, 5, 110, 139, 100], device=device)
    args = (-100, 1.0, 1.0, 0.0, 100, 140)
    got = fwd(TL, h, w, b, y, args)[:3]
    want = ref(h, w, b, y, *args, torch.float64)
    assert torch.isnan(got[0][[4, 5]]).all()
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_all_ignored_and_masked_vocabulary(TL, device):
    h, w, b, y = make(40, 16, 70, torch.float32, device=device)
    y[:20] = -100  # whole row tiles skipped
    b[:32] = float("-inf")  # the first vocabulary tile is masked out entirely
    y[25] = 3      # a label on a masked entry: log-prob -inf, finite gradients elsewhere
    args = (-100, 1.0, 1.0, 0.0, 0, 70)
    logp, lse, ent, rm, ls = fwd(TL, h, w, b, y, args)
    want = ref(h, w, b, y, *args, torch.float64)
    assert (logp[:20] == 0).all() and (rm[:20] == 0).all() and (ls[:20] == 0).all()
    assert (ent[:20] == 0).all()
    assert logp[25] == float("-inf")
    keep = torch.ones(40, dtype=torch.bool)
    keep[25] = False
    for a, r in zip((logp, lse, ent), want):
        torch.testing.assert_close(a[keep].double(), r[keep], rtol=1e-5, atol=1e-5)
    g = torch.randn(40, device=device)
    g[25] = 0.0
    grads = TL.linear_logps_bwd(g, g, h, w, b, y, rm, ls, ent, *args, True, True, True)
    assert all(torch.isfinite(t).all() for t in grads)
    assert (grads[0][:20] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_backward_matches_torch_backend(TL, device, dtype, softcap):
    h, w, b, y = make(29, 40, 75, dtype, seed=3, device=device)
    args = (-100, 0.8, 1.3, softcap, 0, 75)
    _, _, ent, rm, ls = fwd(TL, h, w, b, y, args)
    g = torch.Generator().manual_seed(4)
    gl, ge = torch.randn(29, generator=g).to(device), torch.randn(29, generator=g).to(device)
    got = TL.linear_logps_bwd(gl, ge, h, w, b, y, rm, ls, ent, *args, True, True, True)
    # float64 oracle: autograd through materialised logits
    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (h, w, b))
    lp64, _, ent64 = ref(h64, w64, b64, y, *args, torch.float64)
    (lp64 * gl.double()).sum().add((ent64 * ge.double()).sum()).backward()
    hl, wl, bl = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    lpl, _, entl = ref(hl, wl, bl, y, *args, dtype)
    (lpl * gl.double()).sum().add((entl * ge.double()).sum()).backward()
    for name, a, r, e in zip(("d_hidden", "d_weight", "d_bias"), got, (h64, w64, b64),
                             (hl, wl, bl)):
        assert a.dtype == dtype
        assert_rule(a, r.grad, e.grad, dtype, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_batch_invariant(TL, device, dtype):
    """A token's results are bitwise the same whatever else is in the batch (fixed vocabulary
    splits; row tiles do not mix rows)."""
    h, w, b, y = make(40, 24, 101, dtype, seed=8, device=device, ignore_frac=0.0)
    args = (-100, 0.8, 1.0, 3.0, 0, 101)
    full = TL.linear_logps_fwd(h, w, b, y, *args, True)
    for rows_ in (slice(0, 1), slice(3, 20), slice(17, 40)):
        part = TL.linear_logps_fwd(h[rows_], w, b, y[rows_], *args, True)
        for a, f in zip(part, full):
            assert torch.equal(a, f[rows_])


def test_need_flags_and_mixed_weight_dtype(TL, device):
    h, w, b, y = make(17, 24, 50, torch.bfloat16, seed=5, device=device)
    w32 = w.float()  # fp32 master weight, bf16 activations
    args = (-100, 1.0, 1.0, 0.0, 0, 50)
    lp_a, rm, ls, _ = TL.linear_logps_fwd(h, w32, b, y, *args, False)
    lp_b = TL.linear_logps_fwd(h, w, b, y, *args, False)[0]
    torch.testing.assert_close(lp_a, lp_b)  # the weight is used in the hidden states' dtype
    g = torch.randn(17, device=device)
    d_h, d_w, d_b = TL.linear_logps_bwd(g, None, h, w32, b, y, rm, ls, None, *args, False, True,
                                        False)
    assert d_h.numel() == 0 and d_b.numel() == 0 and d_w.dtype == torch.float32
    full = TL.linear_logps_bwd(g, None, h, w, b, y, rm, ls, None, *args, True, True, True)
    torch.testing.assert_close(d_w, full[1].float(), rtol=1e-2, atol=1e-3)


def test_registered_for_triton_backend(TL, device, monkeypatch):
    """The triton backend's fused head is the chunk loop (matmul + Triton row kernels) by
    default, these tl.dot kernels with FASTDPO_TRITON_LINEAR=dot; both agree."""
    from fastdpo.torch_backend import linear as chunk_loop

    h, w, b, y = make(9, 16, 20, torch.float32, device=device)
    op = ops.get_op("triton", "linear_logps_fwd")
    args = (h, w, b, y, -100, 1.0, 1.0, 0.0, 0, 20, False, False)
    calls = []
    real = chunk_loop.forward_loop
    monkeypatch.setattr(chunk_loop, "forward_loop", lambda *a, **k: calls.append(1) or real(*a, **k))
    default = op(*args)
    assert calls, "the default triton fused head is the chunk loop"
    monkeypatch.setenv("FASTDPO_TRITON_LINEAR", "dot")
    dot = op(*args)
    assert len(calls) == 1
    torch.testing.assert_close(dot[0], TL.linear_logps_fwd(*args[:-1])[0])
    torch.testing.assert_close(default[0], dot[0], rtol=1e-5, atol=1e-5)


def test_interpreter_matches_gpu_bf16_semantics(TL, device):
    """Under the interpreter, bf16 casts round to nearest even and bf16 tl.dot multiplies values
    (both as on GPUs): a bf16 matmul tile equals the fp32 product of the bf16 values."""
    if device.type == "cuda":
        pytest.skip("interpreter-only behaviour")
    from fastdpo.triton import _interpreter

    x = torch.tensor([1.0 + 2**-8 + 2**-10, 1.0 + 2**-9, 1 + 3 * 2**-9, -(1.0 + 2**-8 + 2**-10),
                      float("inf"), float("nan"), 3.4e38, 0.0])
    got = torch.from_numpy(_interpreter.bf16_bits_rtne(x.numpy()).view("int16")).view(
        torch.bfloat16)
    assert torch.equal(got[:5], x[:5].bfloat16()) and torch.isnan(got[5])
    assert torch.equal(got[6:], x[6:].bfloat16())
    h, w, _, y = make(16, 32, 32, torch.bfloat16, device=device, bias=False, ignore_frac=0.0)
    args = (-100, 1.0, 1.0, 0.0, 0, 32)
    lp_b = TL.linear_logps_fwd(h, w, None, y, *args, False)[0]
    lp_f = TL.linear_logps_fwd(h.float(), w.float(), None, y, *args, False)[0]
    torch.testing.assert_close(lp_b, lp_f, rtol=0, atol=1e-5)


def test_interpreter_dot_does_not_depend_on_row_position(TL, device):
    """A GPU's tl.dot forms each output from its own row and column; the interpreter's
    np.matmul goes to the host BLAS, whose micro-kernels (OpenBLAS 0.3.31, Haswell core type on
    an AVX-512 EPYC) round a row differently by its place in the tile, which broke the fused
    head's batch invariance under the interpreter. Corrected: a row's product is bitwise the same
    wherever it sits, and it is the fp32 rounding of the exact product sum."""
    if device.type == "cuda":
        pytest.skip("interpreter-only behaviour")
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 16)).astype(np.float32)
    b = rng.standard_normal((16, 32)).astype(np.float32)

    def dot(rows):
        acc = interpreter.TensorHandle(np.zeros((16, 32), np.float32), tl.float32)
        out = interpreter.InterpreterBuilder().create_dot(
            interpreter.TensorHandle(np.ascontiguousarray(rows), tl.float32),
            interpreter.TensorHandle(b, tl.float32), acc, None, None)
        return out.data

    full = dot(a[0:16])
    for s in range(1, 8):
        assert np.array_equal(dot(a[s:s + 16])[:16 - s], full[s:])
    exact = (a[:16].astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    assert np.array_equal(full, exact)


# ---------------------------------------------------- precision at any offset and temperature


def grads_of(h, w, b, y, args, gl, ge, dtype):
    """Autograd gradients of sum(gl * logp + ge * entropy) through materialised logits."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (h, w, b)]
    lp, _, ent = ref(*leaves, y, *args, dtype if dtype == torch.float64 else torch.float32)
    (lp * gl.double()).sum().add((ent * ge.double()).sum()).backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("offset,temperature", [(1000.0, 1.0), (0.0, 0.01), (-3e4, 0.5)])
def test_offset_and_low_temperature_at_eager_precision(TL, device, offset, temperature):
    """Logits shifted by a per-row constant (through the bias) or sharpened by a low temperature:
    fp32 results within eager's error plus ~1e-7, forward and backward."""
    h, w, b, y = make(21, 32, 75, torch.float32, seed=6, device=device, ignore_frac=0.1)
    w = w * (0.05 if temperature < 1 else 1.0)
    b = b + offset
    args = (-100, temperature, 1.0, 0.0, 0, 75)
    logp, lse, ent, rm, ls = fwd(TL, h, w, b, y, args)
    want = ref(h, w, b, y, *args, torch.float64)
    eager = ref(h, w, b, y, *args, torch.float32)
    for name, a, r, e in zip(("logp", "entropy"), (logp, ent), want[::2], eager[::2]):
        assert_rule(a, r, e, torch.float32, atol=3e-7, what=name)
    g = torch.Generator().manual_seed(7)
    gl, ge = torch.randn(21, generator=g).to(device), torch.randn(21, generator=g).to(device)
    got = TL.linear_logps_bwd(gl, ge, h, w, b, y, rm, ls, ent, *args, True, True, True)
    r64 = grads_of(h, w, b, y, args, gl, ge, torch.float64)
    r32 = grads_of(h, w, b, y, args, gl, ge, torch.float32)
    for name, a, r, e in zip(("d_hidden", "d_weight", "d_bias"), got, r64, r32):
        # sums over tokens in fp32 matmuls: an order-dependent rounding of ~1e-6 relative
        assert_rule(a, r, e, torch.float32, atol=2e-6, what=name)


def test_constant_and_extreme_rows(TL, device):
    """Logits 1e8 everywhere, +-3e38, all -inf: the row contract's exact values."""
    N, H, V = 4, 16, 70
    h = torch.randn(N, H, device=device)
    w = torch.zeros(V, H, device=device)
    b = torch.full((V,), 1e8, device=device)
    y = torch.tensor([0, 69, 5, 3], device=device)
    args = (-100, 1.0, 1.0, 0.0, 0, V)
    logp, lse, ent, rm, ls = fwd(TL, h, w, b, y, args)
    torch.testing.assert_close(logp.double(), torch.full((N,), -math.log(V), dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(ent.double(), torch.full((N,), math.log(V), dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert (rm == 1e8).all()
    gl = torch.ones(N, device=device)
    _, _, d_b = TL.linear_logps_bwd(gl, None, h, w, b, y, rm, ls, None, *args, False, False, True)
    want = torch.full((V,), -N / V, dtype=torch.float64)
    want[y.cpu()] += 1.0
    torch.testing.assert_close(d_b.double().cpu(), want, rtol=0, atol=1e-6)
    assert abs(d_b.sum().item()) < 1e-5  # gradient of each row sums to 0
    # +-3e38 in one row, every entry -inf in another (through the bias, zero weight)
    b2 = torch.zeros(V, device=device)
    b2[7], b2[8] = 3e38, -3e38
    y2 = torch.tensor([7, 8, 1, -100], device=device)
    logp, lse, ent, rm, ls = fwd(TL, h, w, b2, y2, (-100, 2.0, 1.0, 0.0, 0, V))
    assert logp[0].item() == 0.0 and logp[1].item() == pytest.approx(-3e38, rel=1e-6)
    assert torch.isfinite(ls[:3]).all() and (rm[:3] == 3e38).all()
    b3 = torch.full((V,), float("-inf"), device=device)
    logp, lse, ent, rm, ls = fwd(TL, h, w, b3, y2, args)
    assert (rm[:3] == -math.inf).all() and (ls[:3] == -math.inf).all()
    assert (lse[:3] == -math.inf).all() and rm[3] == 0 and ls[3] == 0


AOT_SCRIPT = r"""
import os, re, subprocess, tempfile, torch, triton
from fastdpo.triton import aot
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
specs = []
for dt in (torch.bfloat16, torch.float16):
    specs.append(aot.linear_fwd_spec(4096, 4096, 128256, dt, softcap=True, with_entropy=True))
    specs += aot.linear_grad_specs(4096, 4096, 128256, dt, softcap=True, with_entropy=True)[:1]
# fp32 (FMA products): the variants that spilled with other tile shapes
for bias, cap, ent in ((True, False, False), (True, True, True)):
    specs.append(aot.linear_fwd_spec(4096, 4096, 128256, torch.float32, bias=bias, softcap=cap,
                                     with_entropy=ent))
for bias, cap in ((False, False), (True, True)):
    specs += aot.linear_grad_specs(4096, 4096, 128256, torch.float32, bias=bias, softcap=cap,
                                   with_entropy=True)[:1]
for spec in specs:
    k = aot.compile(spec, 90)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    usage = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", f.name],
                           capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    assert stack == "0", (spec.name, "spills", regs, stack)
    ptx = k.asm["ptx"]
    if "fp32" not in spec.name:
        dt = "bf16" if "bf16" in spec.name else "f16"
        assert "wgmma.mma_async" in ptx and f".f32.{dt}.{dt}" in ptx, spec.name
    print("ok", spec.name, regs, k.metadata.shared)
"""


def test_compiles_for_sm90_with_tensor_cores(TL):
    """Ahead-of-time compilation for Hopper (no GPU needed) of the specs the launchers would
    pick catches what the interpreter lets through (dot shapes, control flow, types), shows the
    bf16/fp16 tiles run on wgmma with fp32 accumulation, and that the heaviest variants of each
    dtype do not spill. Runs in a child process: the interpreter replaces the jit functions
    here."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok") == 8


def test_compile_specs_cover_every_variant(TL):
    """compile_specs lists each kernel variant the launchers can pick, once, with unique names
    (built from meta tensors; nothing is compiled here)."""
    import os
    import subprocess
    import sys

    script = r"""
import torch
from fastdpo.triton import aot
specs = aot.compile_specs([(2, 1024, 2048, 32000)])
names = [s.name for s in specs]
assert len(names) == len(set(names))
seen = {(s.kernel.__name__, tuple(t for t in s.signature.values() if t.startswith("*")),
         tuple(sorted((k, str(v)) for k, v in s.constexprs.items() if k.isupper())))
        for s in specs}
print("n", len(specs), len(seen))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    n, kinds = map(int, res.stdout.split()[1:3])
    # logits: 2 ops x 2 entropy flags x 3 dtypes; fused head: 2 kernels x 8 flag sets x 3 dtypes,
    # and the forward with an fp32 weight for bf16/fp16 hidden states (2 x 8)
    assert kinds == 12 + 48 + 16 and n >= kinds


def test_strided_row_and_column_inputs(TL, device):
    """The tl.dot kernels index the per-row statistics, the gradients and the bias at unit
    stride: strided views of them (a column of a (N, 2) tensor, every other element) give the
    contiguous inputs' results, not neighbouring values (they did before the launchers made
    them contiguous)."""
    N, H, V = 13, 16, 40
    h, w, b, y = make(N, H, V, torch.float32, seed=31, device=device)
    args = (-100, 0.9, 1.2, 0.0, 0, V)

    def strided(t):
        return torch.stack([t, torch.full_like(t, 7.0)], 1)[:, 0] if t.dtype.is_floating_point \
            else torch.stack([t, torch.zeros_like(t)], 1)[:, 0]

    want = TL.linear_logps_fwd(h, w, b, y, *args, True)
    got = TL.linear_logps_fwd(h, w, strided(b), strided(y), *args, True)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
    lp, rm, ls, ent = want
    g = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(device)
    ge = torch.randn(N, generator=torch.Generator().manual_seed(4)).to(device)
    full = TL.linear_logps_bwd(g, ge, h, w, b, y, rm, ls, ent, *args, True, True, True)
    got = TL.linear_logps_bwd(strided(g), strided(ge), h, w, strided(b), strided(y), strided(rm),
                              strided(ls), strided(ent), *args, True, True, True)
    for a, e in zip(got, full):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
