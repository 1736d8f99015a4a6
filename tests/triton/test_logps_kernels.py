"""Kernel-specific tests of the Triton log-prob kernels (fastdpo/triton/logps.py).

The cross-backend API matrix lives in tests/test_logps.py; here the launchers are called directly
with small explicit tiles (``block_v=64``) so every vocabulary size below hits a particular path:
V < tile, V == tile, several tiles plus a masked tail, labels on tile edges. Without a GPU the
kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py) on CPU tensors.
"""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from logps_helpers import BLOCK, INF, NAN, lse_of, make, ref_fwd, ref_grad, run_bwd, run_fwd
from tolerance import assert_rule



# ------------------------------------------------------------------------------ forward paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 1), (1, 1, 37), (2, 2, 64), (2, 3, 200), (1, 4, 129)])
def test_forward_tile_paths(K, device, dtype, shape):
    """V = 1, T = 1, V < tile, V == tile, several tiles + tail; logp, entropy and lse."""
    x, lab = make(*shape, dtype, device, seed=sum(shape))
    t = 0.8
    lp, rm, ls, ent = run_fwd(K, x, lab, temperature=t)
    assert lp.dtype == rm.dtype == ls.dtype == ent.dtype == torch.float32
    lp64, ent64, lse64 = ref_fwd(x, lab, t)
    lplo, entlo, lselo = ref_fwd(x, lab, t, dtype=dtype)
    assert_rule(lp, lp64, lplo, dtype, what="logp")
    assert_rule(ent, ent64, entlo, dtype, what="entropy")
    assert_rule(lse_of(rm, ls, t), lse64, lselo, dtype, what="lse")
    active = lab.cpu() != -100
    # row_max is exactly the max raw logit; log_sum is in [0, log V]
    assert torch.equal(rm.cpu(), torch.where(active, x.cpu().float().amax(-1), 0.0))
    assert bool(((ls >= 0) & (ls <= math.log(shape[-1]) + 1e-6)).all())


def test_labels_on_tile_edges(K, device):
    V = 3 * BLOCK + 5
    x, _ = make(1, 9, V, torch.float32, device, seed=1)
    cols = [0, BLOCK - 1, BLOCK, 2 * BLOCK - 1, 2 * BLOCK, 3 * BLOCK - 1, 3 * BLOCK, V - 2, V - 1]
    lab = torch.tensor([cols], device=device)
    x[0, torch.arange(9), lab[0]] += 4.0  # the label is the row max: any slip shows
    lp, rm, ls, _ = run_fwd(K, x, lab)
    torch.testing.assert_close(lp.cpu().double(), ref_fwd(x, lab)[0], rtol=0, atol=2e-6)
    g = torch.ones(1, 9, device=device)
    grad = run_bwd(K, g, None, x, lab, (rm, ls), None, torch.empty_like(x))
    ref = ref_grad(x, lab, g, torch.zeros_like(g))
    torch.testing.assert_close(grad.cpu().double(), ref, rtol=0, atol=2e-6)


def test_strided_views(K, device):
    """Shifted causal view, transposed batch/time, padded vocabulary, int32 strided labels."""
    big, lab_full = make(5, 4, 150, torch.bfloat16, device, seed=2)
    x = big.transpose(0, 1)[:, :-1, :131]  # (4, 4, 131): strides (150, 600, 1), vocab padded
    lab = lab_full.t()[:, 1:].clamp(max=130).to(torch.int32)  # non-contiguous int32
    assert x.stride() == (150, 600, 1) and not lab.is_contiguous()
    lp, rm, ls, ent = run_fwd(K, x, lab)
    lp64, ent64, lse64 = ref_fwd(x, lab)
    lplo, entlo, _ = ref_fwd(x, lab, dtype=torch.bfloat16)
    assert_rule(lp, lp64, lplo, torch.bfloat16, what="logp")
    assert_rule(ent, ent64, entlo, torch.bfloat16, what="entropy")
    # Backward into a strided view of a larger buffer: only that view is written.
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3)).to(device)
    ge = torch.randn(lp.shape, generator=torch.Generator().manual_seed(4)).to(device)
    canvas = torch.full((5, 4, 150), 7.0, dtype=torch.bfloat16, device=device)
    out = canvas.transpose(0, 1)[:, :-1, :131]
    run_bwd(K, g, ge, x, lab, (rm, ls), ent, out)
    assert_rule(out, ref_grad(x, lab, g, ge), ref_grad(x, lab, g, ge, dtype=torch.bfloat16),
                torch.bfloat16, what="grad")
    untouched = torch.ones_like(canvas, dtype=torch.bool)
    untouched.transpose(0, 1)[:, :-1, :131] = False
    assert bool((canvas[untouched] == 7.0).all())


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
def test_invalid_labels_give_nan(K, device, label_dtype):
    V = 70
    x, _ = make(1, 5, V, torch.float32, device, seed=5)
    lab = torch.tensor([[V, -1, 10**9, -100, V - 1]], dtype=label_dtype, device=device)
    lp, rm, ls, ent = run_fwd(K, x, lab)
    lp = lp.cpu()
    assert torch.isnan(lp[0, :3]).all() and lp[0, 3] == 0 and torch.isfinite(lp[0, 4])
    assert torch.isfinite(lse_of(rm, ls)[0, :3]).all() and torch.isfinite(ent[0, :3]).all()
    # Their gradient is the softmax part only (no one-hot column): -g p.
    g = torch.ones(1, 5, device=device)
    grad = run_bwd(K, g, None, x, lab, (rm, ls), ent, torch.empty_like(x)).cpu()
    p = torch.softmax(x.cpu().double(), -1)
    torch.testing.assert_close(grad[0, :3].double(), -p[0, :3], rtol=0, atol=1e-6)


def test_non_finite_rows(K, device):
    V = 2 * BLOCK + 3
    x, _ = make(1, 8, V, torch.float32, device, seed=6)
    x = x.cpu()
    x[0, 0, 5] = NAN
    x[0, 1, 70] = INF
    x[0, 2, [3, 64, 100, V - 1]] = -INF  # masked tokens: finite results, p = 0 there
    x[0, 3] = -INF  # all masked
    x[0, 4, 0] = INF
    x[0, 4, V - 1] = INF
    x[0, 5, :] = -1e30  # huge but finite (logits from a float mask)
    x[0, 5, 7] = -1e30 + 1e24
    x[0, 6] = NAN  # ignored rows are skipped: no NaN leaks
    x[0, 7] = x[0, 2]  # the label on a masked token
    lab = torch.tensor([[1, 2, 10, 3, 0, 7, -100, 64]])
    x, lab = x.to(device), lab.to(device)
    lp, rm, ls, ent = run_fwd(K, x, lab)
    lp64, ent64, _ = ref_fwd(x, lab)
    assert_rule(lp[:, :7], lp64[:, :7], lp64[:, :7], torch.float32, what="logp")
    assert_rule(ent, ent64, ent64, torch.float32, what="entropy")
    assert lp[0, 7].item() == -INF and lp[0, 6].item() == 0 and ent[0, 6].item() == 0
    # all -inf: no finite reference point
    assert rm[0, 3].item() == -INF and ls[0, 3].item() == -INF
    # NaN / +inf rows: NaN statistics, like the max and sum of eager
    assert math.isnan(ls[0, 0].item()) and math.isnan(rm[0, 0].item())
    assert math.isnan(ls[0, 1].item()) and rm[0, 1].item() == INF
    # Gradient of the masked row: 0 at the -inf entries, and elsewhere the gradient of the row
    # with those entries removed (autograd through the oracle's entropy gives NaN there).
    g, ge = torch.ones(1, 8, device=device), torch.full((1, 8), 0.5, device=device)
    grad = run_bwd(K, g, ge, x, lab, (rm, ls), ent, torch.empty_like(x)).cpu()
    keep = torch.isfinite(x[0, 2].cpu())
    sub_lab = keep[:10].sum().view(1, 1)
    ref = ref_grad(x[0, 2].cpu()[keep].view(1, 1, -1), sub_lab, g[:, :1].cpu(), ge[:, :1].cpu())
    torch.testing.assert_close(grad[0, 2][keep].double(), ref[0, 0], rtol=1e-5, atol=1e-6)
    assert (grad[0, 2][~keep] == 0).all()
    assert (grad[0, 6] == 0).all()


def test_all_ignored_gives_zeros(K, device):
    x, _ = make(2, 3, 100, torch.bfloat16, device, seed=7)
    x[0, 0, 0] = NAN
    lab = torch.full((2, 3), -100, device=device)
    lp, rm, ls, ent = run_fwd(K, x, lab)
    for t in (lp, rm, ls, ent):
        assert torch.equal(t.cpu(), torch.zeros(2, 3))
    out = torch.full_like(x, 3.0)
    run_bwd(K, torch.ones(2, 3, device=device), torch.ones(2, 3, device=device), x, lab,
            (rm, ls), ent, out)
    assert torch.equal(out.cpu(), torch.zeros(2, 3, 100, dtype=torch.bfloat16))
    # In place as well: the ignored rows' logits become zeros.
    run_bwd(K, torch.ones(2, 3, device=device), None, x, lab, (rm, ls), ent, x)
    assert torch.equal(x.cpu(), torch.zeros(2, 3, 100, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------- backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_ge", [False, True])
def test_backward_matches_autograd(K, device, dtype, with_ge):
    x, lab = make(2, 3, 2 * BLOCK + 9, dtype, device, seed=8)
    t = 1.3
    lp, rm, ls, ent = run_fwd(K, x, lab, temperature=t)
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(2, 3, generator=gen).to(device)
    ge = torch.randn(2, 3, generator=gen).to(device) if with_ge else None
    ge_ref = ge if with_ge else torch.zeros_like(g)
    out = run_bwd(K, g, ge, x, lab, (rm, ls), ent if with_ge else None, torch.empty_like(x),
                  temperature=t)
    assert out.dtype == dtype
    assert_rule(out, ref_grad(x, lab, g, ge_ref, t), ref_grad(x, lab, g, ge_ref, t, dtype=dtype),
                dtype, what="grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_equals_out_of_place(K, device, dtype):
    x, lab = make(3, 2, 3 * BLOCK + 1, dtype, device, seed=10)
    x = x[:, :, :]  # a (B, T, V) tensor whose storage the backward overwrites
    lp, rm, ls, ent = run_fwd(K, x, lab)
    gen = torch.Generator().manual_seed(11)
    g, ge = torch.randn(3, 2, generator=gen).to(device), torch.randn(3, 2, generator=gen).to(device)
    out = run_bwd(K, g, ge, x, lab, (rm, ls), ent, torch.empty_like(x))
    ptr = x.data_ptr()
    run_bwd(K, g, ge, x, lab, (rm, ls), ent, x)
    assert x.data_ptr() == ptr
    assert torch.equal(x, out)


# ------------------------------------------------------------------------- vocabulary shards


def test_vocab_shard_semantics(K, device):
    """A shard's logp is z_label - lse_local when it holds the label, else -lse_local; with the
    global lse and entropy the shard gradients are slices of the full gradient."""
    V, cut = 3 * BLOCK + 7, BLOCK + 11
    x, lab = make(2, 4, V, torch.float32, device, seed=12)
    lab[0, 0], lab[0, 1], lab[0, 2] = cut - 1, cut, V - 1  # both sides of the cut
    t = 0.9
    shards = [(0, x[..., :cut]), (cut, x[..., cut:])]
    z64 = x.cpu().double() / t
    active = lab.cpu() != -100
    for start, xs in shards:
        lp, rm, ls, _ = run_fwd(K, xs, lab, temperature=t, vocab_start=start, vocab_total=V)
        zs = z64[..., start:start + xs.shape[-1]]
        lse_loc = torch.logsumexp(zs, -1)
        local = lab.cpu() - start
        inside = (local >= 0) & (local < xs.shape[-1])
        zl = zs.gather(-1, local.clamp(0, xs.shape[-1] - 1)[..., None])[..., 0]
        want = torch.where(inside, zl - lse_loc, -lse_loc)
        want = torch.where(active, want, 0.0)
        torch.testing.assert_close(lp.cpu().double(), want, rtol=0, atol=3e-6)
        torch.testing.assert_close(lse_of(rm, ls, t), torch.where(active, lse_loc, 0.0),
                                   rtol=0, atol=3e-6)
        assert torch.equal(rm.cpu(), torch.where(active, xs.cpu().amax(-1), 0.0))
    # Backward with the global statistics.
    _, rm_g, ls_g, ent_g = run_fwd(K, x, lab, temperature=t)
    gen = torch.Generator().manual_seed(13)
    g, ge = torch.randn(2, 4, generator=gen).to(device), torch.randn(2, 4, generator=gen).to(device)
    full = run_bwd(K, g, ge, x, lab, (rm_g, ls_g), ent_g, torch.empty_like(x), temperature=t)
    for start, xs in shards:
        part = run_bwd(K, g, ge, xs, lab, (rm_g, ls_g), ent_g, torch.empty_like(xs), temperature=t,
                       vocab_start=start, vocab_total=V)
        torch.testing.assert_close(part, full[..., start:start + xs.shape[-1]], rtol=0, atol=0)


# --------------------------------------------------------------------------- 64-bit offsets


def test_offsets_beyond_int32(K, device, tmp_path):
    """Rows living past element 2**32 of their view, reached through strides that each fit in
    int32 (so the JIT types them i32) but whose products and sums do not: ``t * stride_t``
    exceeds 2**31 and ``b * stride_b + t * stride_t`` exceeds 2**32. Any 32-bit step in the
    offset arithmetic reads or writes the wrong row. The view starts 2**31 elements into its
    storage so that such a wrapped offset still lands inside the storage (a wrong answer here,
    not a crash of the test process).

    On CPU the storage is a sparse file mapped with ``torch.from_file(shared=True)``: 12 GiB of
    address space of which only the touched pages (a few KiB) ever materialise. On a GPU it is a
    real 12 GiB allocation.
    """
    B, T, V = 2, 3, 40
    st_b, st_t, start = 2**31 - 2**10, 2**30 + 2**14, 2**31
    last = st_b * (B - 1) + st_t * (T - 1)  # offset of the last row within the view
    assert st_b < 2**31 and st_t < 2**31 and (T - 1) * st_t > 2**31 and last > 2**32
    n = start + last + 2 * V
    if device.type == "cpu":
        base = torch.from_file(str(tmp_path / "sparse.bin"), shared=True, size=n,
                               dtype=torch.float16)
    else:
        base = torch.zeros(n, dtype=torch.float16, device=device)
    x = base.as_strided((B, T, V), (st_b, st_t, 1), storage_offset=start)
    data, lab = make(B, T, V, torch.float16, device, seed=14, ignore_frac=0.0)
    lab[0, 0] = -100
    x.copy_(data)
    got = run_fwd(K, x, lab)
    want_fwd = run_fwd(K, data, lab)  # the same rows, contiguous
    assert all(torch.equal(a, b) for a, b in zip(got, want_fwd))
    stats = got[1:3]
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(15)).to(device)
    want = run_bwd(K, g, None, data, lab, want_fwd[1:3], None, torch.empty_like(data))
    out = base.as_strided((B, T, V), (st_b, st_t, 1), storage_offset=start + V)  # beside x
    run_bwd(K, g, None, x, lab, stats, None, out)
    assert torch.equal(out, want)
    assert torch.equal(x, data)  # out-of-place left the logits alone
    run_bwd(K, g, None, x, lab, stats, None, x)  # in place
    assert torch.equal(x, want)
    if device.type == "cpu":
        assert os.stat(tmp_path / "sparse.bin").st_blocks * 512 < 2**26  # stayed sparse
    del x, out, base


# ----------------------------------------------------------------- configuration and codegen


def test_launch_config_shapes(K, device):
    for V in (1, 1000, 32000, 128256, 152064, 256000):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for op in ("fwd", "bwd"):
                cfg = K.launch_config(V, dtype, op, interpreted=False)
                block, vec, warps = cfg["BLOCK_V"], cfg["VEC"], cfg["num_warps"]
                assert vec * dtype.itemsize == 16
                assert block & (block - 1) == 0 and block % vec == 0 and 1 <= warps <= 8
                if V >= 32000:  # big vocabularies: full 8-warp tiles, <= 64 steps per row
                    assert warps == 8 and block >= 4096 and -(-V // block) <= 64
    small = K.launch_config(50, torch.float32, interpreted=True)["BLOCK_V"]
    assert small == BLOCK  # interpreted tiles stay small so tails are exercised
    with pytest.raises(ValueError):
        K.logps_fwd(torch.zeros(1, 1, 8, device=device),
                    torch.zeros(1, 1, dtype=torch.long, device=device), -100, 1.0, 0, 8, False,
                    block_v=48)


def test_launch_runs_on_the_tensors_device(K, monkeypatch):
    """Launches are guarded by the tensor's device (Triton launches on the current one), and a
    CPU tensor without the interpreter is refused naming the argument."""
    from types import SimpleNamespace

    from fastdpo.triton import _launch

    guard = _launch.device_of(SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_launch.device_of(torch.zeros(1)), torch.cuda.device)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="logits"):
        K.logps_fwd(torch.zeros(1, 1, 8), torch.zeros(1, 1, dtype=torch.long), -100, 1.0, 0, 8,
                    False)


AOT_SCRIPT = textwrap.dedent("""
    import re, subprocess, sys, tempfile, os, torch, triton
    from fastdpo.triton import aot
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    specs = [s for s in aot.compile_specs([(4, 2048, 4096, 128256)], mixed_weight=False)
             if s.name.startswith("logps_")]
    assert len(specs) == 12, [s.name for s in specs]  # fwd/bwd x entropy x 3 dtypes
    for spec in specs:
        for arch in ((80, 90) if "bf16" in spec.name else (90,)):
            ck = aot.compile(spec, arch)
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(ck.asm["cubin"])
            run = lambda *a: subprocess.run([os.path.join(bin_dir, "cuobjdump"), *a, f.name],
                                            capture_output=True, text=True, check=True).stdout
            res = re.search(r"REG:(\\d+) STACK:(\\d+) SHARED:\\d+ LOCAL:(\\d+)", run("-res-usage"))
            sass = run("-sass")
            os.unlink(f.name)
            stream = re.findall(r"LDG\\.E\\.EF[.\\w]*", sass)  # the vocabulary stream's loads
            wide = sum(ld.endswith(".128") for ld in stream)
            spill = int(bool(re.search("STL|LDL", sass)))
            print("row", spec.name.split("(")[0], arch, res[1], res[2], res[3], wide,
                  len(stream) - wide, spill)
""")


def test_aot_compile_vector_loads_no_spills():
    """Every logits-kernel variant the launchers pick (fwd/bwd, entropy or not, each dtype),
    compiled ahead of time with the launchers' own specialisation (no GPU needed), reads the
    logits only with 128-bit loads and never spills."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True,
                          env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows_ = [ln.split()[1:] for ln in proc.stdout.splitlines() if ln.startswith("row ")]
    assert len(rows_) == 16
    for name, arch, regs, stack, local, wide, narrow, spill in rows_:
        assert int(stack) == 0 and int(local) == 0 and spill == "0", (name, arch)
        assert int(wide) >= 2 and int(narrow) == 0, (name, arch, "logits loads not 128-bit")
        assert int(regs) <= 96, (name, arch, regs)
