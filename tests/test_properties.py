"""Property-based tests: random shapes, strides, dtypes, logit offsets, temperatures, ignore
patterns and weights on every backend, held to the tolerance rule against the float64 oracle.

Hypothesis runs derandomized with a fixed example budget per backend (the Triton interpreter is
the slow one) and without shrinking, so CI sees the same cases every time and the file stays
under a minute.
Padding around strided logits is NaN: a kernel that reads outside its view turns it into a NaN.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fastdpo
from fastdpo import reference as R
from tolerance import assert_rule

DTYPES = {"torch": [torch.float32, torch.bfloat16, torch.float16, torch.float64],
          "triton": [torch.float32, torch.bfloat16, torch.float16],
          "native": [torch.float32, torch.bfloat16, torch.float16]}
# examples per test and backend: (token, extremes, sequence, linear)
BUDGET = {"torch": (60, 40, 30, 25), "native": (60, 40, 30, 25), "triton": (20, 12, 8, 8)}
# largest |logit| each dtype holds (with room for the random part)
FMAX = {torch.float64: 1e300, torch.float32: 3.0e38, torch.bfloat16: 3.0e38,
        torch.float16: 6.0e4}
VOCABS = [1, 2, 3, 7, 31, 64, 65, 130, 257]
LAYOUTS = ["contiguous", "vocab_padded", "batch_transposed", "time_strided"]


def run(budget, strategy, check):
    """Run ``check`` on ``budget`` examples of ``strategy``, reproducibly."""
    # no shrinking: on the Triton interpreter it would cost minutes; the failing case is printed
    @settings(max_examples=budget, deadline=None, derandomize=True, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(strategy)
    def inner(case):
        check(case)

    inner()


def temperatures():
    return st.one_of(st.sampled_from([1.0, 0.01, 10.0, 0.7]),
                     st.floats(math.log(0.01), math.log(10.0)).map(math.exp))


def offsets(dtype):
    big = {torch.float16: [1e4, -1e4]}.get(dtype, [1e4, -1e4, 1e8, -1e8])
    return st.sampled_from([0.0, 0.0, 30.0, -1e3] + big)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def with_layout(vals, layout):
    """``vals`` (B, T, V) as a differentiable view with ``layout``; returns (leaf, view)."""
    B, T, V = vals.shape
    nan = float("nan")
    if layout == "vocab_padded":
        buf = torch.full((B, T, V + 3), nan, dtype=vals.dtype)
        buf[..., :V] = vals
        return buf.requires_grad_(True), lambda b: b[..., :V]
    if layout == "time_strided":
        buf = torch.full((B, 2 * T, V), nan, dtype=vals.dtype)
        buf[:, ::2] = vals
        return buf.requires_grad_(True), lambda b: b[:, ::2]
    if layout == "batch_transposed":
        buf = vals.transpose(0, 1).contiguous()
        return buf.requires_grad_(True), lambda b: b.transpose(0, 1)
    return vals.clone().requires_grad_(True), lambda b: b


def rule(out, ref64, eager, dtype, what):
    """The tolerance rule; infinities must match exactly, and where eager overflowed (NaN or inf
    where the oracle is finite) it earns no slack."""
    # a true value beyond the output dtype's range rounds to an infinity
    inf = torch.isinf(ref64.detach().to(out.dtype))
    out, ref64, eager = (t.detach().double() for t in (out, ref64, eager))
    assert torch.equal(torch.isinf(out), inf), f"{what}: infinity pattern differs"
    assert torch.equal(out[inf].sign(), ref64[inf].sign()), f"{what}: infinity sign differs"
    out, ref64 = torch.where(inf, 0.0, out), torch.where(inf, 0.0, ref64)
    eager = torch.where(inf | ~torch.isfinite(eager), ref64, eager)
    assert_rule(out, ref64, eager, dtype, what=what)


def signs(lp, ent, what=""):
    """No log-probability above 0, no entropy below 0 (whatever the rounding)."""
    lp, ent = lp.detach(), ent.detach()
    assert not (lp > 0).any(), f"{what}log-prob > 0: max {lp.nan_to_num(-1).max().item():.3g}"
    assert not (ent < 0).any(), f"{what}entropy < 0: min {ent.nan_to_num(1).min().item():.3g}"


def check_grads(backend, dtype, make_leaf, view, labels, kw, grad_target):
    """Forward + backward through ``view(leaf)``; oracle and eager on the same values."""
    leaf = make_leaf()
    lp, ent = fastdpo.token_logps(view(leaf), labels, return_entropy=True, backend=backend, **kw)
    vals = view(leaf.detach())
    x64 = vals.to(torch.float64, copy=True).requires_grad_(True)
    lp64, ent64 = R.token_logps(x64, labels, return_entropy=True, **kw)
    xlo = vals.clone().requires_grad_(True)
    lplo, entlo = R.token_logps(xlo, labels, return_entropy=True, dtype=dtype, **kw)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    signs(lp, ent)
    rule(lp, lp64, lplo, dtype, "logps")
    rule(ent, ent64, entlo, dtype, "entropy")
    if not grad_target:
        return
    g = gen(1)
    w1, w2 = torch.randn(lp.shape, generator=g), torch.randn(lp.shape, generator=g)
    ((lp * w1).sum() + (ent * w2).sum()).backward()
    ((lp64 * w1.double()).sum() + (ent64 * w2.double()).sum()).backward()
    ((lplo * w1.to(lplo.dtype)).sum() + (entlo * w2.to(entlo.dtype)).sum()).backward()
    grad = view(leaf.grad)
    assert grad.dtype == dtype
    if leaf.grad.isnan().any():  # NaN gradient: only where the oracle's is NaN too
        assert torch.equal(grad.isnan(), x64.grad.isnan()), "gradient NaN pattern differs"
    rule(grad.nan_to_num(0), x64.grad.nan_to_num(0), xlo.grad.nan_to_num(0), dtype, "grad")
    rest = leaf.grad.clone()
    view(rest).zero_()
    assert not rest.any(), "gradient written outside the logits' view"


# ---------------------------------------------------------------- token_logps, random rows


@st.composite
def token_cases(draw, backend):
    dtype = draw(st.sampled_from(DTYPES[backend]))
    two_dim = draw(st.booleans())
    return dict(
        dtype=dtype, two_dim=two_dim, B=1 if two_dim else draw(st.integers(1, 3)),
        T=draw(st.integers(1, 6)), V=draw(st.sampled_from(VOCABS)),
        layout=draw(st.sampled_from(LAYOUTS)), offset=draw(offsets(dtype)),
        scale=draw(st.sampled_from([0.1, 1.0, 5.0, 30.0])), temperature=draw(temperatures()),
        ignore=draw(st.sampled_from(["none", "some", "all", "alternate"])),
        ignore_index=draw(st.sampled_from([-100, -1, 0])), shift=draw(st.booleans()),
        int32=draw(st.booleans()), grad=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 20)))


def make_labels(g, B, T, V, ignore, ignore_index, int32):
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = {"none": torch.zeros(B, T, dtype=torch.bool),
            "some": torch.rand(B, T, generator=g) < 0.3,
            "all": torch.ones(B, T, dtype=torch.bool),
            "alternate": (torch.arange(T) % 2 == 0).expand(B, T)}[ignore]
    labels[mask] = ignore_index
    return labels.to(torch.int32) if int32 else labels


def check_token_case(backend, c):
    g = gen(c["seed"])
    B, T, V, dtype = c["B"], c["T"], c["V"], c["dtype"]
    vals = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * c["scale"]
            + c["offset"]).to(dtype)
    labels = make_labels(g, B, T, V, c["ignore"], c["ignore_index"], c["int32"])
    labels = labels.t().contiguous().t()  # non-contiguous labels
    make_leaf, view = (lambda: with_layout(vals, c["layout"])[0]), with_layout(vals, c["layout"])[1]
    if c["two_dim"]:
        inner = view
        view, labels = (lambda b: inner(b)[0]), labels[0]
    kw = dict(temperature=c["temperature"], shift=c["shift"], ignore_index=c["ignore_index"])
    check_grads(backend, dtype, make_leaf, view, labels, kw, c["grad"])


def test_token_logps_properties(backend):
    run(BUDGET[backend][0], token_cases(backend), lambda c: check_token_case(backend, c))


# ---------------------------------------------------------------- several labels, lse, any shape


@st.composite
def extra_cases(draw, backend):
    dtype = draw(st.sampled_from(DTYPES[backend]))
    return dict(dtype=dtype, lead=draw(st.sampled_from([(3,), (2, 3), (2, 2, 3), (1, 2, 2, 2)])),
                V=draw(st.sampled_from(VOCABS)), k=draw(st.sampled_from([None, 1, 3])),
                lse=draw(st.booleans()), offset=draw(offsets(dtype)),
                temperature=draw(temperatures()), shift=draw(st.booleans()),
                ignore=draw(st.sampled_from(["none", "some", "all"])),
                seed=draw(st.integers(0, 2 ** 20)))


def oracle_extras(x, labels, k, lse, dtype=torch.float64, **kw):
    """log-probs (one per label) and the masked lse, from fastdpo.reference."""
    if k is None:
        lp = R.token_logps(x, labels, dtype=dtype, **kw)
        active = labels != -100
    else:
        lp = torch.stack([R.token_logps(x, labels[..., j], dtype=dtype, **kw)
                          for j in range(k)], -1)
        active = (labels != -100).any(-1)
    if not lse:
        return lp, None
    z = x[..., :-1, :] if kw["shift"] else x
    act = active[..., 1:] if kw["shift"] else active
    return lp, torch.where(act, torch.logsumexp(z.to(dtype) / kw["temperature"], -1), 0.0)


def check_extra_case(backend, c):
    g = gen(c["seed"])
    lead, V, k, dtype = c["lead"], c["V"], c["k"], c["dtype"]
    vals = (torch.randn(*lead, V, generator=g, dtype=torch.float64) * 3 + c["offset"]).to(dtype)
    n = math.prod(lead) * (k or 1)
    labels = make_labels(g, 1, n, V, c["ignore"], -100, False).view(lead + ((k,) if k else ()))
    kw = dict(temperature=c["temperature"], shift=c["shift"])
    x = vals.clone().requires_grad_(True)
    out = fastdpo.token_logps(x, labels, return_lse=c["lse"], backend=backend, **kw)
    lp, lse = out if c["lse"] else (out, None)
    x64 = vals.to(torch.float64, copy=True).requires_grad_(True)
    lp64, lse64 = oracle_extras(x64, labels, k, c["lse"], **kw)
    xlo = vals.clone().requires_grad_(True)
    lplo, lselo = oracle_extras(xlo, labels, k, c["lse"], dtype=dtype, **kw)
    assert lp.shape == lp64.shape
    signs(lp, torch.zeros(()))
    rule(lp, lp64, lplo, dtype, "logps")
    total = [lp.sum(), lp64.sum(), lplo.sum()]
    if c["lse"]:
        rule(lse, lse64, lselo, dtype, "lse")
        total = [t + 0.5 * s.sum() for t, s in zip(total, (lse, lse64, lselo))]
    for t in total:
        t.backward()
    rule(x.grad, x64.grad, xlo.grad, dtype, "grad")


def test_token_logps_extras_properties(backend):
    run(BUDGET[backend][3], extra_cases(backend), lambda c: check_extra_case(backend, c))


# ---------------------------------------------------------------- extreme rows


@st.composite
def extreme_cases(draw, backend):
    dtype = draw(st.sampled_from(DTYPES[backend]))
    return dict(dtype=dtype, V=draw(st.sampled_from([1, 2, 5, 64, 130])),
                pattern=draw(st.sampled_from(["const", "dominant", "two_top", "masked",
                                              "near_max", "tiny_gap"])),
                magnitude=draw(st.sampled_from([1e4, 1e8, 1e30, None])),
                sign=draw(st.sampled_from([1.0, -1.0])), temperature=draw(temperatures()),
                seed=draw(st.integers(0, 2 ** 20)))


def extreme_rows(c):
    """(4, V) rows of one pattern at a magnitude the dtype holds; labels avoid -inf entries."""
    dtype, V = c["dtype"], c["V"]
    big = FMAX[dtype] if c["magnitude"] is None else min(c["magnitude"], FMAX[dtype])
    big *= c["sign"]
    g = gen(c["seed"])
    x = torch.randn(4, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (4,), generator=g)
    p = c["pattern"]
    if p == "const":
        x = torch.full((4, V), big, dtype=torch.float64)
    elif p == "dominant":  # one logit far above the rest: logp of it is 0, never above
        x = torch.full((4, V), -abs(big), dtype=torch.float64)
        x[torch.arange(4), labels] = abs(big)
    elif p == "two_top":
        x = x.clamp(max=0) + big
        x[:, 0] = x[:, -1] = big + 1.0 if abs(big) < 1e6 else big
    elif p == "masked":  # -inf entries (masked vocabulary), one row entirely
        x = x + big
        x[torch.rand(4, V, generator=g) < 0.5] = -math.inf
        x[torch.arange(4), labels] = big
        x[3] = -math.inf
    elif p == "near_max":
        x = (torch.rand(4, V, generator=g, dtype=torch.float64) * 2 - 1) * FMAX[dtype]
    elif p == "tiny_gap":  # logits that differ in their last bits only
        x = big * (1 + torch.randint(-3, 4, (4, V), generator=g).double()
                   * torch.finfo(dtype).eps)
    return x.to(dtype).view(1, 4, V), labels.view(1, 4)


def check_extreme_case(backend, c):
    vals, labels = extreme_rows(c)
    grad = c["pattern"] != "masked"  # a -inf row's gradient is NaN-free only by convention
    check_grads(backend, c["dtype"], lambda: vals.clone().requires_grad_(True), lambda b: b,
                labels, dict(temperature=c["temperature"]), grad)


def test_extreme_logits_properties(backend):
    run(BUDGET[backend][1], extreme_cases(backend), lambda c: check_extreme_case(backend, c))


# ---------------------------------------------------------------- sequence_logps


@st.composite
def sequence_cases(draw, backend):
    dtype = draw(st.sampled_from(DTYPES[backend]))
    packed = draw(st.booleans())
    T = draw(st.integers(1, 9))
    cuts = sorted(draw(st.lists(st.integers(0, T), max_size=3))) if packed else []
    return dict(dtype=dtype, packed=packed, B=1 if packed else draw(st.integers(1, 3)), T=T,
                V=draw(st.sampled_from(VOCABS)), cu=[0] + cuts + [T],
                offset=draw(offsets(dtype)), temperature=draw(temperatures()),
                ignore=draw(st.sampled_from(["none", "some", "all"])),
                weights=draw(st.sampled_from([None, "positive", "with_zeros", "negative"])),
                average=draw(st.booleans()), shift=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 20)))


def check_sequence_case(backend, c):
    g = gen(c["seed"])
    B, T, V, dtype = c["B"], c["T"], c["V"], c["dtype"]
    vals = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3 + c["offset"]).to(dtype)
    labels = make_labels(g, B, T, V, c["ignore"], -100, False)
    w = None
    if c["weights"]:
        w = torch.rand(B, T, generator=g) * 2 + 0.01
        if c["weights"] == "negative":  # average divides by a negative sum
            w = -w
        if c["weights"] == "with_zeros":
            w[torch.rand(B, T, generator=g) < 0.3] = 0.0
            w[labels == -100] = float("nan")  # never read: the token is ignored
    kw = dict(temperature=c["temperature"], shift=c["shift"], average=c["average"])
    if c["packed"]:
        vals, labels = vals[0], labels[0]
        w = None if w is None else w[0]
        kw["cu_seqlens"] = torch.tensor(c["cu"], dtype=torch.int32)
    x = vals.clone().requires_grad_(True)
    out = fastdpo.sequence_logps(x, labels, token_weights=w, backend=backend, **kw)
    w_ref = None if w is None else w.nan_to_num(0.0)
    ref64 = R.sequence_logps(vals.double(), labels, token_weights=w_ref, **kw)
    eager = R.sequence_logps(vals, labels, token_weights=w_ref, dtype=dtype, **kw)
    assert torch.isfinite(out).all()
    # a sequence sums up to T token errors
    rule(out, ref64, eager, dtype, "sequence logps")
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_sequence_logps_properties(backend):
    run(BUDGET[backend][2], sequence_cases(backend), lambda c: check_sequence_case(backend, c))


# ---------------------------------------------------------------- fused LM head


@st.composite
def linear_cases(draw, backend):
    dtype = draw(st.sampled_from(DTYPES[backend]))
    return dict(dtype=dtype, lead=draw(st.sampled_from([(5,), (2, 3), (1, 1), (3, 4)])),
                H=draw(st.sampled_from([1, 8, 33])), V=draw(st.sampled_from(VOCABS)),
                bias=draw(st.sampled_from([None, 0.0, 30.0, 1e4])),
                logit_scale=draw(st.sampled_from([1.0, 0.5, -2.0])),
                softcap=draw(st.sampled_from([None, None, 30.0])),
                temperature=draw(temperatures()), shift=draw(st.booleans()),
                ignore=draw(st.sampled_from(["none", "some", "all"])),
                seed=draw(st.integers(0, 2 ** 20)))


def head_logits(h, w, b, logit_scale, softcap):
    z = h @ w.t()
    if b is not None:
        z = z + b
    z = z * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def check_linear_case(backend, c):
    g = gen(c["seed"])
    dtype, lead, H, V = c["dtype"], c["lead"], c["H"], c["V"]
    hidden = torch.randn(*lead, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (2.0 / H ** 0.5)).to(dtype)
    bias = None
    if c["bias"] is not None:
        bias = (torch.randn(V, generator=g) + c["bias"]).to(dtype)
    labels = make_labels(g, 1, math.prod(lead), V, c["ignore"], -100, False).view(lead)
    kw = dict(temperature=c["temperature"], shift=c["shift"])
    head = dict(logit_scale=c["logit_scale"], softcap=c["softcap"])
    leaves = [None if t is None else t.clone().requires_grad_(True)
              for t in (hidden, weight, bias)]
    lp, ent = fastdpo.linear_token_logps(leaves[0], leaves[1], labels, bias=leaves[2],
                                         return_entropy=True, backend=backend, **kw, **head)
    as64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    lp64, ent64 = R.token_logps(head_logits(*as64, **head), labels, return_entropy=True, **kw)
    lplo, entlo = R.token_logps(head_logits(hidden, weight, bias, **head), labels,
                                return_entropy=True, dtype=dtype, **kw)
    signs(lp, ent)
    rule(lp, lp64, lplo, dtype, "linear logps")
    rule(ent, ent64, entlo, dtype, "linear entropy")
    (lp.sum() + ent.sum()).backward()
    assert all(t is None or torch.isfinite(t.grad).all() for t in leaves)


def test_linear_token_logps_properties(backend):
    run(BUDGET[backend][3], linear_cases(backend), lambda c: check_linear_case(backend, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_signs_at_the_dtype_limits(backend, dtype):
    """Deterministic corners of the sign property, on every dtype: a dominant logit at the
    dtype's maximum, a constant row of 1e8 (logp = -log V, a gradient summing to 0)."""
    fmax = torch.finfo(dtype).max
    V = 37
    x = torch.full((1, 3, V), -fmax, dtype=dtype)
    x[0, 0, 5] = fmax
    x[0, 1] = min(1e8, fmax)
    x[0, 2, :] = torch.linspace(-fmax, fmax, V, dtype=torch.float64).to(dtype)
    labels = torch.tensor([[5, 3, V - 1]])
    for temperature in (1.0, 0.01, 10.0):
        xx = x.clone().requires_grad_(True)
        lp, ent = fastdpo.token_logps(xx, labels, return_entropy=True, temperature=temperature,
                                      backend=backend)
        signs(lp, ent, f"T={temperature}: ")
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
        torch.testing.assert_close(lp[0, 1], torch.tensor(-math.log(V)), rtol=1e-6, atol=1e-6)
        lp.sum().backward()
        assert torch.isfinite(xx.grad).all()
        # (softmax - onehot) / temperature sums to 0, up to the rounding of V entries
        bound = 2 * V * torch.finfo(dtype).eps / temperature
        assert abs(xx.grad[0, 1].double().sum().item()) < bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_several_labels_gradient_cancels(backend, dtype):
    """All k labels of a position on a token of probability ~1: the gradient there cancels to
    ~0, as in eager; it must not keep a rounding of k / temperature."""
    x = torch.zeros(3, 4, dtype=dtype)
    x[:, 1:] = -30.0  # token 0 holds all the mass
    labels = torch.zeros(3, 3, dtype=torch.long)
    for temperature in (1.0, 0.7):
        xx = x.clone().requires_grad_(True)
        fastdpo.token_logps(xx, labels, backend=backend, temperature=temperature).sum().backward()
        x64 = x.double().requires_grad_(True)
        R.token_logps(x64[:, None, :].expand(3, 3, 4), labels,
                      temperature=temperature).sum().backward()
        xlo = x.clone().requires_grad_(True)
        R.token_logps(xlo[:, None, :].expand(3, 3, 4), labels, temperature=temperature,
                      dtype=dtype).sum().backward()
        rule(xx.grad, x64.grad, xlo.grad, dtype, f"grad (T={temperature})")
