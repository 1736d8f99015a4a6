"""Triton fused-LM-head kernels (fastdpo/triton/linear.py) at the op level.

Without a GPU they run under TRITON_INTERPRET=1 (set by tests/conftest.py) on CPU tensors, with
the bf16 up-cast path the interpreter needs; the GPU build is checked by compiling the kernels
ahead of time for sm_90 (tensor-core instructions present) without a GPU.
"""

import pytest
import torch

from fastdpo import backends, ops
from tolerance import assert_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def TL(device):
    why = backends.device_reason("triton", device)
    if why:
        pytest.skip(f"triton unavailable: {why}")
    import fastdpo.triton.linear as mod

    return mod


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
    z = (z / temperature).double() if dtype != torch.float64 else z / temperature
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,V", [(1, 16, 32), (37, 24, 101), (20, 48, 3)])
def test_forward_matches_reference(TL, device, dtype, N, H, V):
    h, w, b, y = make(N, H, V, dtype, device=device)
    args = (-100, 0.9, 0.7, 4.0, 0, V)
    logp, lse, ent = TL.linear_logps_fwd(h, w, b, y, *args, True)
    want = ref(h, w, b, y, *args, torch.float64)
    eager = ref(h, w, b, y, *args, dtype)
    for name, a, r, e in zip(("logp", "lse", "entropy"), (logp, lse, ent), want, eager):
        assert a.dtype == torch.float32 and a.shape == (N,)
        assert_rule(a, r, e, dtype, what=name)


def test_vocab_shard_and_bad_labels(TL, device):
    h, w, b, y = make(12, 16, 40, torch.float32, device=device, ignore_frac=0.0)
    y = torch.tensor([0, 99, 100, 139, 140, -3, 120, 101, 5, 110, 139, 100], device=device)
    args = (-100, 1.0, 1.0, 0.0, 100, 140)
    got = TL.linear_logps_fwd(h, w, b, y, *args, True)
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
    logp, lse, ent = TL.linear_logps_fwd(h, w, b, y, *args, True)
    want = ref(h, w, b, y, *args, torch.float64)
    assert (logp[:20] == 0).all() and (lse[:20] == 0).all() and (ent[:20] == 0).all()
    assert logp[25] == float("-inf")
    keep = torch.ones(40, dtype=torch.bool)
    keep[25] = False
    for a, r in zip((logp, lse, ent), want):
        torch.testing.assert_close(a[keep].double(), r[keep], rtol=1e-5, atol=1e-5)
    g = torch.randn(40, device=device)
    g[25] = 0.0
    grads = TL.linear_logps_bwd(g, g, h, w, b, y, lse, ent, *args, True, True, True, False)
    assert all(torch.isfinite(t).all() for t in grads)
    assert (grads[0][:20] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_backward_matches_torch_backend(TL, device, dtype, softcap):
    h, w, b, y = make(29, 40, 75, dtype, seed=3, device=device)
    args = (-100, 0.8, 1.3, softcap, 0, 75)
    logp, lse, ent = TL.linear_logps_fwd(h, w, b, y, *args, True)
    g = torch.Generator().manual_seed(4)
    gl, ge = torch.randn(29, generator=g).to(device), torch.randn(29, generator=g).to(device)
    got = TL.linear_logps_bwd(gl, ge, h, w, b, y, lse, ent, *args, True, True, True, False)
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


def test_need_flags_and_mixed_weight_dtype(TL, device):
    h, w, b, y = make(17, 24, 50, torch.bfloat16, seed=5, device=device)
    w32 = w.float()  # fp32 master weight, bf16 activations
    args = (-100, 1.0, 1.0, 0.0, 0, 50)
    lp_a, lse, _ = TL.linear_logps_fwd(h, w32, b, y, *args, False)
    lp_b, _, _ = TL.linear_logps_fwd(h, w, b, y, *args, False)
    torch.testing.assert_close(lp_a, lp_b)  # the weight is used in the hidden states' dtype
    g = torch.randn(17, device=device)
    d_h, d_w, d_b = TL.linear_logps_bwd(g, None, h, w32, b, y, lse, None, *args, False, True,
                                        False, True)
    assert d_h.numel() == 0 and d_b.numel() == 0 and d_w.dtype == torch.float32
    full = TL.linear_logps_bwd(g, None, h, w, b, y, lse, None, *args, True, True, True, True)
    torch.testing.assert_close(d_w, full[1].float(), rtol=1e-2, atol=1e-3)


def test_registered_for_triton_backend(TL, device):
    h, w, b, y = make(9, 16, 20, torch.float32, device=device)
    out = ops.get_op("triton", "linear_logps_fwd")(h, w, b, y, -100, 1.0, 1.0, 0.0, 0, 20, False)
    torch.testing.assert_close(out[0], TL.linear_logps_fwd(h, w, b, y, -100, 1.0, 1.0, 0.0, 0, 20,
                                                           False)[0])


def test_interpreter_bf16_needs_upcast(TL, device):
    """The flag the launcher sets: bf16 under the interpreter is computed from fp32 tiles."""
    if device.type == "cuda":
        pytest.skip("interpreter-only behaviour")
    h, w, _, _ = make(4, 16, 8, torch.bfloat16)
    assert TL._flags(h, w)[0] is True
    assert TL._flags(h.half(), w.half())[0] is False


AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
import fastdpo.triton.linear as TL

common = dict(stride_hn="i64", stride_hk="i64", stride_wv="i64", stride_wk="i64",
              stride_l="i64", ignore_index="i64", vocab_start="i64", scale="fp32",
              cap="fp32", inv_temp="fp32", N="i32", V="i32", H="i32",
              h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", lab_ptr="*i64")
const = dict(HAS_BIAS=True, SOFTCAP=True, UPCAST=False, PREC="tf32", BLOCK_N=128,
             BLOCK_V=128, BLOCK_K=64)
fwd_sig = dict(common, m_ptr="*fp32", s_ptr="*fp32", u_ptr="*fp32", zl_ptr="*fp32",
               tiles_per_split="i32")
bwd_sig = dict(common, lse_ptr="*fp32", ent_ptr="*fp32", gl_ptr="*fp32", ge_ptr="*fp32",
               dz_ptr="*bf16", stride_dz="i64")
for fn, sig, extra in ((TL._linear_fwd_kernel, fwd_sig, dict(WITH_ENTROPY=True)),
                       (TL._linear_grad_tile_kernel, bwd_sig, dict(HAS_GE=True))):
    consts = dict(const, **extra)
    sig = dict(sig, **{k: "constexpr" for k in consts})
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=8, num_stages=3))
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx and ".f32.bf16.bf16" in ptx, fn
    print("ok", fn.__name__ if hasattr(fn, "__name__") else fn, k.metadata.shared)
"""


def test_compiles_for_sm90_with_tensor_cores(TL):
    """Ahead-of-time compilation for Hopper (no GPU needed) catches what the interpreter lets
    through (dot shapes, control flow, types) and shows the tiles run on wgmma with fp32
    accumulation. Runs in a child process: the interpreter replaces the jit functions here."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok") == 2
