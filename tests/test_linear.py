"""Fused LM head (fastdpo.linear_*): every backend against float64 logits through fastdpo.reference,
against the logits path, gradcheck, memory bound of the chunk loop, determinism, tied embeddings."""

import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastdpo
from fastdpo import reference as R
from fastdpo.autograd import linear_loss as AL
from fastdpo.torch_backend import linear as L
from fastdpo.torch_backend import matmul as M
from fastdpo.linear import linear_sequence_logps, linear_token_logps
from tolerance import assert_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(lead, H, V, dtype, *, seed=0, ignore_frac=0.25, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    labels = torch.randint(0, V, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignore_frac] = -100
    return hidden, weight, b, labels


head_logits = R.head_logits  # in h's dtype: eager, or float64 for the oracle


def leaves(*ts, grad=True):
    return [None if t is None else t.detach().clone().requires_grad_(grad) for t in ts]


def check(backend, hidden, weight, bias, labels, *, logit_scale=1.0, softcap=None, **kw):
    """logps, entropy and the gradients of hidden/weight/bias under the tolerance rule."""
    dtype = hidden.dtype
    h, w, b = leaves(hidden, weight, bias)
    lp, ent = linear_token_logps(h, w, labels, bias=b, logit_scale=logit_scale, softcap=softcap,
                                 return_entropy=True, backend=backend, **kw)
    h64, w64, b64 = leaves(*(None if t is None else t.double() for t in (hidden, weight, bias)))
    lp64, ent64 = R.token_logps(head_logits(h64, w64, b64, logit_scale=logit_scale,
                                            softcap=softcap), labels, return_entropy=True, **kw)
    hlo, wlo, blo = leaves(hidden, weight, bias)
    lplo, entlo = R.token_logps(head_logits(hlo, wlo, blo, logit_scale=logit_scale,
                                            softcap=softcap), labels, return_entropy=True,
                                dtype=dtype, **kw)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rule(lp, lp64, lplo, dtype, what="logps")
    assert_rule(ent, ent64, entlo, dtype, what="entropy")
    g = torch.Generator().manual_seed(1)
    c1, c2 = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    for a, e, t in ((lp, ent, torch.float32), (lp64, ent64, torch.float64), (lplo, entlo, dtype)):
        ((a * c1.to(a.dtype)).sum() + (e * c2.to(e.dtype)).sum()).backward()
    for name, x, x64, xlo in (("d_hidden", h, h64, hlo), ("d_weight", w, w64, wlo),
                              ("d_bias", b, b64, blo)):
        if x is None:
            continue
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape, name
        assert_rule(x.grad, x64.grad, xlo.grad, dtype, what=name)
    return lp, ent


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,H,V", [((2, 5), 24, 70), ((1,), 16, 1), ((3, 2), 40, 33)])
def test_matches_reference(backend, dtype, lead, H, V):
    check(backend, *make(lead, H, V, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_softcap_bias_scale_temperature(backend, dtype):
    h, w, b, y = make((2, 6), 24, 77, dtype, seed=2, bias=True)
    check(backend, h * 4, w, b, y, logit_scale=0.8, softcap=6.0, temperature=0.7, shift=True)


@pytest.mark.parametrize("opts", [dict(shift=True), dict(temperature=1.3),
                                  dict(softcap=3.0, logit_scale=2.0),
                                  dict(ignore_index=-1, shift=True)])
def test_options(backend, opts):
    h, w, b, y = make((2, 7), 16, 45, torch.float32, seed=3, bias=True)
    if opts.get("ignore_index") == -1:
        y = torch.where(y == -100, -1, y)
    check(backend, h, w, b, y, **opts)


def test_two_dim_rows_int32_labels_non_contiguous(backend):
    big, w, _, y = make((7, 3), 24, 40, torch.float32, seed=4)
    h = big.transpose(0, 1)  # (3, 7, H), leading dims not mergeable: reshape copies B*T*H
    assert not h.is_contiguous()
    check(backend, h, w, None, y.t().contiguous(), shift=True)
    check(backend, big[:, 0], w, None, y[:, 0].to(torch.int32), shift=True)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("shift", [False, True])
def test_agrees_with_logits_path(backend, average, shift):
    h, w, b, y = make((3, 6), 24, 50, torch.float32, seed=5, bias=True)
    y[1] = -100  # an all-ignored sequence: 0 and no NaN
    tw = torch.rand(3, 6, generator=torch.Generator().manual_seed(3))
    kw = dict(token_weights=tw, average=average, shift=shift, temperature=0.9)
    h1, w1, b1 = leaves(h, w, b)
    out = linear_sequence_logps(h1, w1, y, bias=b1, softcap=5.0, backend=backend, **kw)
    h2, w2, b2 = leaves(h, w, b)
    ref = fastdpo.sequence_logps(head_logits(h2, w2, b2, softcap=5.0), y, backend="torch", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out[1].item() == 0.0
    out.sum().backward()
    ref.sum().backward()
    for a, c in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shift", [False, True])
def test_cu_seqlens_and_entropy_reduction(backend, shift):
    h, w, _, y = make((11,), 16, 23, torch.float32, seed=8, ignore_frac=0.1)
    cu = torch.tensor([0, 4, 4, 9, 11], dtype=torch.int32)
    out, ent = linear_sequence_logps(h, w, y, cu_seqlens=cu, shift=shift, return_entropy=True,
                                     average=True, backend=backend)
    z = head_logits(h.double(), w.double(), None)
    ref = R.sequence_logps(z, y, cu_seqlens=cu, shift=shift, average=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    tok_ent = fastdpo.token_logps(z, fastdpo.logps.mask_sequence_starts(y, cu, -100) if shift
                                  else y, shift=shift, return_entropy=True, backend="torch")[1]
    ent_ref = fastdpo.logps.reduce_sequences(
        tok_ent, fastdpo.logps.mask_sequence_starts(y, cu, -100) if shift else y,
        ignore_index=-100, token_weights=None, average=True, shift=shift, cu_seqlens=cu,
        validate=True)
    assert out.shape == ent.shape == (4,)
    torch.testing.assert_close(ent.double(), ent_ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64(monkeypatch):
    # Tiny tiles: several token blocks (d_weight partials), vocabulary chunks and token tiles.
    monkeypatch.setattr(L, "plan", lambda N, V, H, it, **k: L.Plan(4, 3, 4))
    h, w, b, y = make((2, 5), 4, 11, torch.float64, seed=9, bias=True)
    tw = torch.rand(2, 5, dtype=torch.float64)

    def f(h, w, b):
        lp, ent = linear_token_logps(h, w, y, bias=b, return_entropy=True, temperature=0.8,
                                     softcap=2.0, logit_scale=1.5, shift=True, backend="torch")
        return lp, ent, linear_sequence_logps(h, w, y, bias=b, token_weights=tw, average=True,
                                              backend="torch")

    assert torch.autograd.gradcheck(f, tuple(leaves(h, w, b)))


def test_small_chunks_bf16_within_rule(monkeypatch):
    """Many token blocks (d_weight summed in bf16 per block) still meet the accuracy rule."""
    monkeypatch.setattr(L, "plan", lambda N, V, H, it, **k: L.Plan(5, 3, 64))
    check("torch", *make((4, 5), 32, 150, torch.bfloat16, seed=10, bias=True), softcap=4.0)


def test_only_some_grads_and_tied_embeddings(backend):
    V, H = 37, 16
    torch.manual_seed(0)
    emb = torch.nn.Embedding(V, H)
    proj = torch.nn.Linear(H, H)
    ids = torch.randint(0, V, (2, 6))
    labels = ids.clone()
    labels[0, :2] = -100

    def run(fused):
        emb.zero_grad()
        proj.zero_grad()
        hidden = torch.tanh(proj(emb(ids)))
        if fused:
            out = linear_sequence_logps(hidden, emb.weight, labels, shift=True, backend=backend)
        else:
            out = fastdpo.sequence_logps(hidden @ emb.weight.t(), labels, shift=True,
                                         backend="torch")
        out.sum().backward()
        return out.detach(), emb.weight.grad.clone(), proj.weight.grad.clone()

    for a, c in zip(run(True), run(False)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # weight frozen: only d_hidden is computed
    h, w, _, y = make((2, 4), 16, 30, torch.float32)
    h.requires_grad_(True)
    linear_token_logps(h, w, y, backend=backend).sum().backward()
    h2 = h.detach().clone().requires_grad_(True)
    fastdpo.token_logps(h2 @ w.t(), y, backend="torch").sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_deterministic_weight_grad(backend):
    h, w, b, y = make((3, 9), 32, 90, torch.bfloat16, seed=11, bias=True)
    grads = []
    for _ in range(2):
        h1, w1, b1 = leaves(h, w, b)
        linear_sequence_logps(h1, w1, y, bias=b1, softcap=3.0,
                              backend=backend).sum().backward()
        grads.append((h1.grad, w1.grad, b1.grad))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


def test_reference_pass_saves_nothing(backend):
    h, w, b, y = make((2, 4), 16, 30, torch.float32, bias=True)
    h.requires_grad_(True)
    w.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.no_grad():
            out = linear_sequence_logps(h, w, y, bias=b, shift=True, backend=backend)
        assert not out.requires_grad and saved == []
        linear_sequence_logps(h, w, y, bias=b, shift=True, backend=backend)
    own = {t.data_ptr() for t in (h, w, b)}
    extra = [t for t in saved if t.data_ptr() not in own]
    assert sum(t.numel() for t in extra) <= 8 * y.numel()  # O(tokens), no logits


def test_validation_errors():
    h, w, b, y = make((2, 4), 16, 30, torch.float32)
    with pytest.raises(ValueError, match="weight must be"):
        linear_token_logps(h, w[:, :8], y)
    with pytest.raises(ValueError, match="labels must have shape"):
        linear_token_logps(h, w, y[:, :3])
    with pytest.raises(ValueError, match="bias must have shape"):
        linear_token_logps(h, w, y, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="softcap"):
        linear_token_logps(h, w, y, softcap=-1.0)
    with pytest.raises(ValueError, match="labels must lie"):
        linear_token_logps(h, w, torch.full_like(y, 30))
    bad = torch.full_like(y, 30)
    assert torch.isnan(linear_token_logps(h, w, bad, validate=False, backend="torch")).all()


# ------------------------------------------------------------------------------------- memory


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages allocated under the mode and still alive; tracks the peak."""

    def __init__(self):
        super().__init__()
        self.live, self.cur, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.live and ptr in inputs:
                    continue  # in place or a view of something made before the mode
                if ptr not in self.live:
                    self.live[ptr] = [t.untyped_storage().nbytes(), 0]
                    self.cur += self.live[ptr][0]
                    self.peak = max(self.peak, self.cur)
                self.live[ptr][1] += 1
                weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.cur -= entry[0]
            del self.live[ptr]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_loop_extra_memory_within_budget(monkeypatch, dtype):
    """Beyond inputs, outputs and gradients the loop holds <= 5% of the (N, V) logits."""
    monkeypatch.setattr(L, "MIN_BUDGET", 0)
    N, H, V = 512, 32, 4096
    h, w, b, y = make((N,), H, V, dtype, bias=True)
    logits_bytes = N * V * h.element_size()
    with LiveBytes() as m:
        lp, m_, s_, ent = L.forward_loop("torch", h, w, b, y, -100, 1.0, 1.0, 3.0, 0, V, True)
        fwd_peak = m.peak
    slack = 64 * N  # O(tokens) statistics
    assert fwd_peak - 4 * 4 * N <= 0.05 * logits_bytes + slack, fwd_peak
    g = torch.randn(N)
    with LiveBytes() as m:
        grads = L.backward_loop(L.RowKernelTiles("torch"), g, g, h, w, b, y, m_, s_, ent, -100,
                                1.0, 1.0, 3.0, 0, V, True, True, True)
        grad_bytes = sum(t.numel() * t.element_size() for t in grads)
        extra = m.peak - grad_bytes
    assert extra <= 0.05 * logits_bytes + slack, (extra, logits_bytes)


@pytest.mark.parametrize("softcap", [0.0, 3.0])
def test_gradient_tile_holds_what_the_plan_counts(softcap):
    """A gradient tile's buffers per logits element are what the plan budgets (tile_bytes): on
    CUDA with bf16 operands that includes the d logits cast for the matmuls (2 bytes beside the
    fp32 tile and its tanh); the plan counted 4 (8 with softcap) where the tile held 6 (10).
    Run on CPU with fp32 operands for the logits and bf16 as the matmuls' dtype."""
    from fastdpo.torch_backend.matmul import dz_bytes
    st = fastdpo.backends.status("native")
    assert st.loaded, st.reason
    assert dz_bytes(torch.bfloat16, torch.device("cuda")) == 2
    assert dz_bytes(torch.bfloat16, torch.device("cpu")) == dz_bytes(torch.float32,
                                                                      torch.device("cuda")) == 0
    n, H, V = 96, 16, 700
    h, w, _, y = make((n,), H, V, torch.float32, ignore_frac=0.0)
    lp, m_, s_, _ = L.forward_loop("native", h, w, None, y, -100, 1.0, 1.0, softcap, 0, V, False)
    tiles = L.RowKernelTiles("native", softcap, dz_bytes(torch.bfloat16, torch.device("cuda")))
    tiles.reserve(n * V)
    with LiveBytes() as m:
        dz = tiles.grad_tile(h, w, None, y, torch.randn(n), None, m_, s_, None, -100, 1.0, 1.0,
                             softcap, 0, V, torch.bfloat16)
        peak = m.peak
    assert dz.dtype == torch.bfloat16 and dz.shape == (n, V)
    assert peak <= tiles.tile_bytes * n * V + 16 * n, (peak / (n * V), tiles.tile_bytes)
    cap = AL.plan_rows(10 ** 6, V, 2, bool(softcap), dz=2)  # the fused loss's chunks count it too
    assert cap * AL.row_bytes(V, bool(softcap), 2) <= AL.CHUNK_FRACTION * 10 ** 6 * V * 2
    assert AL.row_bytes(V, bool(softcap), 2) == V * (6 if not softcap else 10)


@pytest.mark.parametrize("N", [4096, 16384])
@pytest.mark.parametrize("H", [2048, 4096, 8192])
def test_plan_budget_at_128k_vocab(N, H):
    """The chunk plan's own accounting stays within 5% of bf16 logits at V = 128k."""
    V = 128 * 1024
    p = L.plan(N, V, H, 2)
    acc_h = p.block_rows * H * 4
    per_chunk = 2 * p.tile_cols * H * 4
    tile = p.tile_rows * (p.tile_cols * L.TILE_COPIES * 4 + H * 4)
    assert acc_h + per_chunk + tile <= 0.05 * N * V * 2
    assert p.tile_cols >= 64 and p.tile_rows >= 64  # matmuls stay reasonably shaped


@pytest.mark.parametrize("N,V,H,grad", [(1024, 128256, 4096, False), (32, 256000, 4096, False),
                                         (4096, 128256, 4096, True), (16384, 128256, 8192, True)])
def test_cuda_plan_tiles_outweigh_their_launches(N, V, H, grad):
    """On CUDA (bf16, weight used in place) each tile's matmul must outlast the host's launches
    for it (~150 us, MIN_BUDGET_CUDA's estimate at ~790 TFLOP/s): at most a few hundred tiles
    per pass, not thousands (the 16 MiB CPU floor gave 4008 for the first shape)."""
    tb = L.tile_bytes_of("triton", 0.0)
    p = L.plan(N, V, H, 2, tile_bytes=tb, hidden_acc=grad, weight_direct=not grad,
               device="cuda")
    tiles = -(-N // p.tile_rows) * -(-V // p.tile_cols)
    gemm_s = 2 * p.tile_rows * p.tile_cols * H / 790e12
    assert gemm_s >= 150e-6 or p.tile_rows == N and p.tile_cols == V, (p, gemm_s)
    assert tiles <= 256, (p, tiles)
    cpu = L.plan(N, V, H, 2, tile_bytes=tb, hidden_acc=grad, weight_direct=not grad)
    assert cpu == L.plan(N, V, H, 2, tile_bytes=tb, hidden_acc=grad, weight_direct=not grad,
                         device="cpu")


@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_acc_half_operands_bound_the_temporary(monkeypatch, device, accumulate):
    """A half-precision product into an fp32 ``out`` (d_weight, accumulated chunk by chunk) is
    written straight into ``out`` by an fp32-output matmul where there is one (CUDA), else
    formed in row slices of at most MM_TEMP_BYTES: before, one full-size fp32 temporary (2.1 GB
    for a 128256 x 4096 head)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g).bfloat16().to(device)
    b = torch.randn(16, 40, generator=g).bfloat16().to(device)
    out = torch.full((300, 40), 1.5, device=device)
    monkeypatch.setattr(M, "MM_TEMP_BYTES", 32 * 40 * 4)  # 32 rows a slice
    with LiveBytes() as m:
        got = M.mm_acc(a, b, out=out, accumulate=accumulate)
    assert got is out
    want = a.float() @ b.float() + (1.5 if accumulate else 0.0)
    torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)  # bf16 products (CPU rounds)
    if device.type == "cpu":  # the sliced path: the same bits as one bf16 matmul
        torch.testing.assert_close(out, (a @ b).float() + (1.5 if accumulate else 0.0),
                                   rtol=0, atol=0)
    slice_bytes, full_bytes = 32 * 40 * 4, 300 * 40 * 4
    assert m.peak <= 3 * slice_bytes < full_bytes, m.peak  # a slice's bf16 + fp32, the last one's


def test_compile_fullgraph():
    h, w, b, y = make((2, 5), 16, 30, torch.float32, bias=True)

    def step(h, w, b):
        return linear_sequence_logps(h, w, y, bias=b, shift=True, softcap=3.0,
                                     backend="torch").sum()

    h2, w2, b2 = leaves(h, w, b)
    ref = step(h2, w2, b2)  # eager first: backends load (imports cannot be traced)
    ref.backward()
    h1, w1, b1 = leaves(h, w, b)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(h1, w1, b1)
    out.backward()
    torch.testing.assert_close(out, ref)
    for a, c in ((h1, h2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, c.grad)


@pytest.mark.parametrize("frozen", [False, True])
def test_batch_invariant_public_api(backend, frozen):
    """batch_invariant=True: a token's log-prob and its d_hidden row are bitwise the same whether
    it is scored alone, in a batch of 5 or in a batch of 37 (every backend, fused head)."""
    g = torch.Generator().manual_seed(21)
    H, V = 16, 150
    hidden = torch.randn(37, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 4
    labels = torch.randint(0, V, (37,), generator=g)
    outs = []
    for n in (1, 5, 37):
        h = hidden[:n].clone().requires_grad_(True)
        w = weight.clone().requires_grad_(not frozen)
        lp = linear_token_logps(h, w, labels[:n], softcap=7.0, batch_invariant=True,
                                backend=backend)
        lp.sum().backward()
        outs.append((lp[0].detach(), h.grad[0]))
    for lp0, dh0 in outs[1:]:
        assert torch.equal(lp0, outs[0][0]) and torch.equal(dh0, outs[0][1])
