"""GPU quality of fastdpo's Triton kernels, checked without a GPU.

* traffic (counted under TRITON_INTERPRET=1): forward and backward move at most 1.05x the minimum
  (logits read once per non-ignored row, gradient written once, per-token tensors once);
* ahead-of-time builds for sm_80 and sm_90 with the launchers' GPU configuration: no spills and
  only 128-bit global loads in the streaming loops.

The counter and the SASS reader are first checked on cases with known answers.
"""

import os

import pytest
import torch

from backend_checks import backend_or_skip
from fastdpo.bench.inspect import sass, static, traffic

LIMIT = 1.05


@pytest.fixture(scope="module")
def triton_backend(request):
    # The kernels run under the interpreter on CPU whatever device the suite targets.
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # On GPU machines conftest leaves the interpreter off: counting happens in a subprocess.
        return backend_or_skip(request, "triton", torch.device("cuda"))
    return backend_or_skip(request, "triton", torch.device("cpu"))


# ---------------------------------------------------------------- the tools themselves


@pytest.mark.skipif(not traffic.interpreted_here(), reason="needs this process interpreted")
def test_counter_counts_masked_in_bytes_of_a_copy_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    x = torch.randn(1000)
    y = torch.empty(1000)
    with traffic.TrafficCounter() as c:
        copy[(4,)](x, y, 1000, BLOCK=256)  # 1024 lanes, 1000 masked in
    assert torch.equal(x, y)
    t = c.totals()
    assert t["load_bytes"] == 4000 and t["store_bytes"] == 4000
    parts = c.by_region({"x": x, "y": y})
    assert parts["x"]["load_bytes"] == parts["x"]["unique_load_bytes"] == 4000
    assert parts["y"]["store_bytes"] == 4000 and "other" not in parts
    assert len(c.launches) == 1 and c.launches[0].params["BLOCK"] == {"constexpr": 256}
    assert c.launches[0].params["src"]["type"] == "*fp32"


SASS = """
        Function : k
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0030*/                   LDG.E.64 R12, desc[UR4][R6.64] ;
        /*0040*/                   STL [R1], R2 ;
        /*0050*/              @!P0 BRA 0x20 ;
        /*0060*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_sass_reader_finds_loops_widths_and_local_memory():
    k = sass.analyse("k", sass.parse_instructions(SASS))
    assert k.loops == [(0x20, 0x50)]  # the BRA-to-self padding is not a loop
    assert k.loop_loads == {128: 1, 64: 1} and k.narrowest_loop_load == 64
    assert k.global_loads == {32: 1, 128: 1, 64: 1}
    assert k.loop_stores == {} and k.global_stores == {128: 1}
    assert k.local_ops == 1 and k.scope == "loops"


# ---------------------------------------------------------------- fastdpo's kernels


@pytest.fixture(scope="module")
def traffic_rows(triton_backend):
    cases = traffic.default_cases(vocabs=(5003,), peers=False)  # tails, unaligned rows
    cases += traffic.default_cases(vocabs=(32000,), dtypes=("bfloat16",), B=1, T=2, peers=False)
    rows = traffic.measure(cases)
    rows += traffic.measure(traffic.default_cases(vocabs=(3001,), dtypes=("float32",),
                                                  peers=False), ignored_rows=2)
    return rows


def test_traffic_within_5_percent_of_minimum(traffic_rows):
    assert len(traffic_rows) == 12
    for r in traffic_rows:
        assert "error" not in r, r
        where = f"{r['op']} {r['dtype']} V={r['V']} ignored={r['ignored_rows']}"
        assert r["ratio"] <= LIMIT, f"{where}: {r['ratio']:.3f}x the minimum"
        assert r["logits_reads_per_active_row"] == pytest.approx(1.0, abs=0.01), where
        grad = r["by_tensor"].get("grad_logits", r["by_tensor"]["logits"])
        if r["op"].startswith("bwd"):
            # The gradient is written exactly once, every row (ignored rows get zeros).
            assert grad["store_bytes"] == grad["unique_store_bytes"] == \
                r["B"] * r["T"] * r["V"] * (4 if r["dtype"] == "float32" else 2), where
        else:
            assert r["by_tensor"]["logits"]["store_bytes"] == 0, where


def test_ignored_rows_are_not_read(traffic_rows):
    rows = [r for r in traffic_rows if r["ignored_rows"]]
    assert rows
    for r in rows:
        active = r["B"] * r["T"] - r["ignored_rows"]
        assert r["by_tensor"]["logits"]["load_bytes"] <= active * r["V"] * 4 * 1.001


@pytest.fixture(scope="module")
def static_rows(triton_backend):
    jobs = static.fastdpo_spec_jobs(dtypes=("float32", "bfloat16"), entropy=(False, True))
    return static.compile_all(jobs, archs=(80, 90))


def test_aot_builds_do_not_spill_and_stream_128_bit(static_rows):
    assert len(static_rows) == 16
    for r in static_rows:
        assert "error" not in r, r
        where = f"{r['kernel']} {r['dtype']} entropy={r['with_entropy']} {r['arch']}"
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, where
        assert r["local_bytes"] == 0 and r["sass"]["local_ops"] == 0, where
        s = r["sass"]
        assert s["scope"] == "loops" and s["streaming_loops"] >= 1, where
        assert s["narrowest_loop_load"] == s["widest_loop_load"] == 128, (where, s["loop_loads"])
        if r["op"] == "bwd":
            assert s["narrowest_loop_store"] == 128, (where, s["loop_stores"])
        assert 0 < r["registers"] <= 255, where
