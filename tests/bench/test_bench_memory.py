"""The memory profiler: isolated peaks, bytes saved for backward, the scaling fit and budget."""

import pytest
import torch

from fastdpo.bench import impls, memory
from fastdpo.bench.workloads import Case

MiB = 1 << 20


def test_peak_rss_reset_and_vmhwm_track_a_known_allocation():
    if not memory.reset_peak_rss():
        pytest.fail("/proc/self/clear_refs is not writable: the CPU profiler cannot run")
    before = memory.proc_status_kib("VmRSS")
    x = torch.ones(64 * MiB // 4)  # 64 MiB, touched
    del x
    grown = (memory.proc_status_kib("VmHWM") - before) * 1024
    assert 60 * MiB <= grown <= 80 * MiB


def test_saved_for_backward_counts_unique_storages_beyond_inputs():
    x = torch.randn(64, 1000, requires_grad=True)
    lab = torch.randint(0, 1000, (1, 64))
    eager = impls.eager_seq_logps
    got = memory.saved_for_backward(eager, (x.unsqueeze(0), lab), exclude=[x, lab])
    # log_softmax saves its fp32 output: one logits-sized tensor beyond the inputs.
    assert got["saved_bytes_extra"] >= x.numel() * 4
    fast = impls.by_name(["fastdpo[torch]"])[0].build("logits", None)
    got = memory.saved_for_backward(fast, (x.unsqueeze(0), lab), exclude=[x, lab])
    assert got["saved_bytes_extra"] <= 64 * 4 * 4  # O(tokens): lse and friends only


@pytest.fixture(scope="module")
def peaks():
    case = Case("logps_fwd_bwd", vocab=32000, tokens=1024)  # 125 MiB of fp32 logits
    chosen = impls.by_name(["eager", "fastdpo[torch]"])
    rows = memory.profile([case], chosen, "cpu", isolated=True, log=None)
    return {r["impl"]: r for r in rows}


def test_isolated_peaks_are_measured_and_ordered(peaks):
    for r in peaks.values():
        assert r["status"] == "ok", r
        assert r["inputs_bytes"] >= r["logits_bytes"] == 1024 * 32000 * 4
        assert "VmHWM" in r["method"]
    # Eager holds log_softmax's output, its gradient and the logits' gradient: >= 2 logits.
    assert peaks["eager"]["peak_extra_x_logits"] >= 2.0
    # In-place backward into the logits: only bounded chunk temporaries on top.
    assert peaks["fastdpo[torch]"]["peak_extra_bytes"] < 0.75 * peaks["eager"]["peak_extra_bytes"]
    assert peaks["fastdpo[torch]"]["saved_bytes_extra"] < peaks["eager"]["saved_bytes_extra"]


def test_fit_and_budget_recover_a_line():
    rows = [{"status": "ok", "workload": "w", "impl": "i", "vocab": 10, "dtype": "f", "hidden": 0,
             "tokens": n, "peak_total_bytes": 1000 + 40 * n, "peak_extra_bytes": 0}
            for n in (100, 200, 400)]
    (fit,) = memory.fit_scaling(rows)
    assert fit["a_bytes"] == pytest.approx(1000) and fit["b_bytes_per_token"] == pytest.approx(40)
    (b,) = memory.budget([fit], gib=1.0, seq_len=1000)
    assert b["max_tokens"] == (2**30 - 1000) // 40
    assert b["max_batch"] == b["max_tokens"] // 1000
    assert memory.fit_scaling(rows[:1]) == []  # one token count: no fit
