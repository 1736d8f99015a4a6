"""The torch-free header math (csrc/include/fastdpo) that both the CPU and the CUDA kernels run,
exposed through fastdpo.native._C, against float64 on hard cases; and the AVX2 exp and storage
conversions of the CPU kernels."""

import math

import pytest
import torch

from fastdpo import backends

_C = None


@pytest.fixture(scope="module", autouse=True)
def native_c():
    global _C
    st = backends.status("native")
    assert st.loaded, f"native extension failed to load: {st.reason}"
    from fastdpo.native import _C as c

    _C = c


INF = float("inf")

CASES = {
    "plain": [0.3, -1.2, 2.5, 0.0, 1.7],
    "huge": [80.0, 79.5, -80.0, 60.0],
    "huge_negative": [-1000.0, -1001.0, -999.5],
    "tiny_spread": [1e-7, -1e-7, 0.0, 2e-7],
    "wide": [-1e4, 50.0, -60.0, 10.0],
    "all_equal": [3.25] * 9,
    "with_neg_inf": [-INF, 1.0, -INF, 2.0, -INF],
    "leading_neg_inf": [-INF, -INF, -INF, 5.0],
    "increasing": [float(i) for i in range(-20, 21, 3)],
    "decreasing": [float(i) for i in range(20, -21, -3)],
    "single": [4.0],
}


def ref_lse_entropy(values):
    z = torch.tensor(values, dtype=torch.float64)
    m = z.max() if torch.isfinite(z.max()) else 0.0
    zs = z - m  # entropy is shift-invariant; shifting avoids cancelling large |z|
    lse = torch.logsumexp(zs, 0)
    p = torch.exp(zs - lse)
    ent = lse - torch.where(p > 0, p * zs, 0.0).sum()
    return (lse + m).item(), ent.item()


def close(a, b, rel):
    return abs(a - b) <= rel * (1 + abs(b))


@pytest.mark.parametrize("dtype,rel", [("float32", 3e-6), ("float64", 1e-12)])
@pytest.mark.parametrize("block", [1, 2, 3, 64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_state_matches_float64(case, block, dtype, rel):
    values = CASES[case]
    lse_ref, ent_ref = ref_lse_entropy(values)
    lse, ent = _C.finalize(_C.state_of(values, block, True, dtype), dtype)
    assert close(lse, lse_ref, rel), (lse, lse_ref)
    assert close(ent, ent_ref, rel * 10), (ent, ent_ref)
    lse2, _ = _C.finalize(_C.state_of(values, block, False, dtype), dtype)
    assert lse2 == lse  # the entropy accumulator never feeds back into (m, s)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_of_parts_is_state_of_whole(case, dtype):
    values = CASES[case]
    rel = 3e-6 if dtype == "float32" else 1e-12
    whole = _C.finalize(_C.state_of(values, 1, True, dtype), dtype)
    for cut in range(len(values) + 1):
        a = _C.state_of(values[:cut], 1, True, dtype)
        b = _C.state_of(values[cut:], 1, True, dtype)
        for merged in (_C.merge(a, b, True, dtype), _C.merge(b, a, True, dtype)):
            lse, ent = _C.finalize(merged, dtype)
            assert close(lse, whole[0], rel) and close(ent, whole[1], 10 * rel)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_merge_with_empty_states(dtype):
    empty = _C.state_of([], 1, True, dtype)
    assert empty == (-INF, 0.0, 0.0)
    # Two empty states (max -inf on both sides) merge without a NaN.
    assert _C.merge(empty, empty, True, dtype) == (-INF, 0.0, 0.0)
    s = _C.state_of([1.5, -2.0, 0.25], 1, True, dtype)
    assert _C.merge(empty, s, True, dtype) == s
    assert _C.merge(s, empty, True, dtype) == s
    # A state of only -inf elements is an empty state.
    assert _C.state_of([-INF, -INF], 1, True, dtype) == (-INF, 0.0, 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_finalize_degenerate_rows(dtype):
    lse, ent = _C.finalize(_C.state_of([-INF, -INF, -INF], 1, True, dtype), dtype)
    assert lse == -INF and math.isnan(ent)
    lse, ent = _C.finalize(_C.state_of([7.0], 2, True, dtype), dtype)
    assert lse == 7.0 and ent == 0.0
    # As log_softmax: a +inf logit makes the whole row NaN.
    lse, ent = _C.finalize(_C.state_of([1.0, INF, 3.0], 1, True, dtype), dtype)
    assert math.isnan(lse) and math.isnan(ent)
    lse, ent = _C.finalize(_C.state_of([1.0, float("nan"), 3.0], 2, True, dtype), dtype)
    assert math.isnan(lse) and math.isnan(ent)


def grad_ref(x, inv_temp, g, g_ent, lse, ent, is_label):
    z = x * inv_temp
    p = math.exp(z - lse)
    d = g * ((1.0 if is_label else 0.0) - p)
    if g_ent:
        d -= g_ent * p * (z - lse + ent)
    return d * inv_temp


@pytest.mark.parametrize("dtype,rel", [("float32", 2e-6), ("float64", 1e-13)])
def test_grad_element_matches_formula(dtype, rel):
    g = torch.Generator().manual_seed(0)
    row = (torch.randn(50, generator=g, dtype=torch.float64) * 4).tolist()
    for inv_temp in (1.0, 1 / 0.7):
        lse, ent = ref_lse_entropy([v * inv_temp for v in row])
        for x in row[:10]:
            for gl, ge in ((0.7, 0.0), (-1.3, 0.4), (0.0, 2.0)):
                for is_label in (False, True):
                    want = grad_ref(x, inv_temp, gl, ge, lse, ent, is_label)
                    got = _C.grad_element(x, inv_temp, gl, ge, lse, ent, is_label, dtype)
                    assert abs(got - want) <= rel * (abs(want) + abs(gl) + abs(ge) * (1 + ent))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_element_masked_logit_is_exactly_zero(dtype):
    for ge in (0.0, 3.0, -1e3):
        assert _C.grad_element(-INF, 1.0, 0.5, ge, 2.0, 1.0, False, dtype) == 0.0
    # The label term survives a masked label logit; only the softmax part vanishes.
    assert _C.grad_element(-INF, 2.0, 0.5, 0.0, 2.0, 1.0, True, dtype) == 1.0


def avx2_or_fail():
    assert _C.avx2_supported() == (_C.cpu_kernel() in ("avx2", "generic"))
    if not _C.avx2_supported():
        pytest.skip("this CPU has no AVX2/FMA/F16C (the scalar kernels are tested instead)")


def test_avx2_exp_accuracy():
    avx2_or_fail()
    xs = torch.cat([torch.linspace(-87.3, 88.0, 200001, dtype=torch.float64),
                    torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 0.34657359])]).float()
    got = torch.tensor(_C.exp_avx2(xs.tolist()), dtype=torch.float64)
    want = torch.exp(xs.double())
    rel = ((got - want) / want).abs().max().item()
    assert rel < 4e-7, rel  # within ~3 ulp of the exact exp of the fp32 argument
    assert _C.exp_avx2([0.0]) == [1.0]  # the max element of a row contributes exactly 1


def test_avx2_exp_special_values():
    avx2_or_fail()
    got = _C.exp_avx2([-INF, -88.0, -100.0, -1e30, float("nan"), 88.0])
    assert got[:4] == [0.0, 0.0, 0.0, 0.0]  # masked logits contribute exactly nothing
    assert math.isnan(got[4])
    assert got[5] == pytest.approx(math.exp(88.0), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", ["avx2", "generic"])
def test_storage_round_trip_matches_torch(dtype, kernel):
    if kernel == "avx2":
        avx2_or_fail()
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([
        torch.randn(4000, generator=g) * 3,
        torch.randn(2000, generator=g) * 1e-6,          # fp16 subnormals
        torch.randn(1000, generator=g) * 1e5,            # fp16 overflow
        torch.tensor([0.0, -0.0, INF, -INF, 65504.0, 65520.0, 65519.0, 6.1e-5, 3e-8, 1e-45,
                      3.4e38, -3.4e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-11]),
    ]).float()
    # Exact ties of bf16 rounding: halfway between neighbours, both parities.
    bits = torch.randint(0, 2**15, (1000,), generator=g, dtype=torch.int32) << 16 | 0x8000
    vals = torch.cat([vals, bits.view(torch.float32)[torch.isfinite(bits.view(torch.float32))]])
    got = torch.tensor(_C.round_trip(vals.tolist(), str(dtype).split(".")[1], kernel))
    want = vals.to(dtype).float()
    assert torch.equal(got, want)
    nan = _C.round_trip([float("nan")] * 9, str(dtype).split(".")[1], kernel)
    assert all(math.isnan(v) for v in nan)
