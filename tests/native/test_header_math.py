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
    "offset_1000": [1000.0 + v for v in (0.3, -1.2, 2.5, 0.0, 1.7, -0.4)],
    "constant_1e8": [1e8] * 40,
    "near_fp32_max": [3e38, 2.9e38, -3e38, 3e38],
    "tiny_spread": [1e-7, -1e-7, 0.0, 2e-7],
    "wide": [-1e4, 50.0, -60.0, 10.0],
    "all_equal": [3.25] * 9,
    "with_neg_inf": [-INF, 1.0, -INF, 2.0, -INF],
    "leading_neg_inf": [-INF, -INF, -INF, 5.0],
    "increasing": [float(i) for i in range(-20, 21, 3)],
    "decreasing": [float(i) for i in range(20, -21, -3)],
    "single": [4.0],
}
INV_TEMPS = (1.0, 1 / 0.7, 100.0)


def f32(values):
    """The fp32 values the float32 instantiation sees (the reference uses the same inputs)."""
    return torch.tensor(values, dtype=torch.float32).double().tolist()


def ref_stats(values, inv_temp=1.0):
    """float64 (row_max, log_sum, entropy) of raw logits `values` at scale inv_temp."""
    x = torch.tensor(values, dtype=torch.float64)
    m = x.max().item()
    d = (x - (m if math.isfinite(m) else 0.0)) * inv_temp
    log_sum = torch.logsumexp(d, 0)
    p = torch.exp(d - log_sum)
    ent = log_sum - torch.where(p > 0, p * d, 0.0).sum()
    return m, log_sum.item(), ent.item()


def close(a, b, rel):
    return abs(a - b) <= rel * (1 + abs(b))


@pytest.mark.parametrize("dtype,rel", [("float32", 3e-6), ("float64", 1e-12)])
@pytest.mark.parametrize("block", [1, 2, 3, 64])
@pytest.mark.parametrize("inv_temp", INV_TEMPS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_state_matches_float64(case, inv_temp, block, dtype, rel):
    values = f32(CASES[case])
    m_ref, ls_ref, ent_ref = ref_stats(values, inv_temp)
    m, ls, ent = _C.finalize(_C.state_of(values, block, True, dtype, inv_temp), dtype)
    assert m == m_ref  # the max of the raw logits, exactly
    # log_sum is in [0, log V]: its error is absolute, whatever the offset or temperature.
    assert abs(ls - ls_ref) <= rel * (1 + math.log(len(values))), (ls, ls_ref)
    assert close(ent, ent_ref, rel * 10), (ent, ent_ref)
    _, ls2, _ = _C.finalize(_C.state_of(values, block, False, dtype, inv_temp), dtype)
    assert ls2 == ls  # the entropy accumulator never feeds back into (m, s)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_of_parts_is_state_of_whole(case, dtype):
    values = f32(CASES[case])
    rel = 3e-6 if dtype == "float32" else 1e-12
    for c in INV_TEMPS:
        whole = _C.finalize(_C.state_of(values, 1, True, dtype, c), dtype)
        for cut in range(len(values) + 1):
            a = _C.state_of(values[:cut], 1, True, dtype, c)
            b = _C.state_of(values[cut:], 1, True, dtype, c)
            for merged in (_C.merge(a, b, True, dtype, c), _C.merge(b, a, True, dtype, c)):
                m, ls, ent = _C.finalize(merged, dtype)
                assert m == whole[0]
                assert close(ls, whole[1], rel) and close(ent, whole[2], 10 * rel)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_merge_with_empty_states(dtype):
    empty = _C.state_of([], 1, True, dtype)
    assert empty == (-INF, 0.0, 0.0)
    # Two empty states (max -inf on both sides) merge without a NaN.
    assert _C.merge(empty, empty, True, dtype) == (-INF, 0.0, 0.0)
    s = _C.state_of([1.5, -2.0, 0.25], 1, True, dtype, 3.0)
    assert _C.merge(empty, s, True, dtype, 3.0) == s
    assert _C.merge(s, empty, True, dtype, 3.0) == s
    # A state of only -inf elements is an empty state.
    assert _C.state_of([-INF, -INF], 1, True, dtype) == (-INF, 0.0, 0.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_finalize_degenerate_rows(dtype):
    m, ls, ent = _C.finalize(_C.state_of([-INF, -INF, -INF], 1, True, dtype), dtype)
    assert m == -INF and ls == -INF and math.isnan(ent)
    assert _C.finalize(_C.state_of([7.0], 2, True, dtype, 100.0), dtype) == (7.0, 0.0, 0.0)
    # As log_softmax: a +inf or NaN logit makes the row NaN (row_max as amax: +inf, NaN).
    m, ls, ent = _C.finalize(_C.state_of([1.0, INF, 3.0], 1, True, dtype), dtype)
    assert m == INF and math.isnan(ls) and math.isnan(ent)
    for block in (1, 2):
        m, ls, ent = _C.finalize(_C.state_of([1.0, float("nan"), 3.0], block, True, dtype), dtype)
        assert math.isnan(m) and math.isnan(ls) and math.isnan(ent)
        m, ls, ent = _C.finalize(_C.state_of([-INF, float("nan")], block, True, dtype), dtype)
        assert math.isnan(m) and math.isnan(ls) and math.isnan(ent)


def grad_ref(x, inv_temp, g, g_ent, row_max, log_sum, ent, is_label):
    d = (x - row_max) * inv_temp - log_sum
    p = math.exp(d)
    out = g * ((1.0 if is_label else 0.0) - p)
    if g_ent:
        out -= g_ent * p * (d + ent)
    return out * inv_temp


@pytest.mark.parametrize("dtype,rel", [("float32", 2e-6), ("float64", 1e-13)])
@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_grad_element_matches_formula(dtype, rel, offset):
    g = torch.Generator().manual_seed(0)
    row = f32((torch.randn(50, generator=g, dtype=torch.float64) * 4 + offset).tolist())
    for inv_temp in INV_TEMPS:
        m, ls, ent = ref_stats(row, inv_temp)
        for x in row[:10]:
            for gl, ge in ((0.7, 0.0), (-1.3, 0.4), (0.0, 2.0)):
                for is_label in (False, True):
                    want = grad_ref(x, inv_temp, gl, ge, m, ls, ent, is_label)
                    got = _C.grad_element(x, inv_temp, gl, ge, m, ls, ent, is_label, dtype)
                    scale = inv_temp * (abs(want) + abs(gl) + abs(ge) * (1 + ent))
                    assert abs(got - want) <= rel * scale, (x, inv_temp, got, want)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_element_masked_logit_is_exactly_zero(dtype):
    for ge in (0.0, 3.0, -1e3):
        assert _C.grad_element(-INF, 1.0, 0.5, ge, 4.0, 2.0, 1.0, False, dtype) == 0.0
    # The label term survives a masked label logit; only the softmax part vanishes.
    assert _C.grad_element(-INF, 2.0, 0.5, 0.0, 4.0, 2.0, 1.0, True, dtype) == 1.0


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
