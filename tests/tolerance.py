"""The accuracy rule every kernel is held to, against a float64 reference.

``|out - ref64| <= 2 * |eager_lowprec - ref64| + atol``: a kernel may be at most twice as far from
the exact answer as plain PyTorch computing in the input's own precision (fp32 math for bf16/fp16
inputs in our kernels makes them usually much closer).
"""

import torch

ATOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


def assert_rule(out, ref64, eager_lowprec, dtype, atol=None, what="output"):
    atol = ATOL[dtype] if atol is None else atol
    out, ref64, eager = (t.detach().double().cpu() for t in (out, ref64, eager_lowprec))
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref64)
    assert torch.equal(nan_out, nan_ref), f"{what}: NaN pattern differs"
    out, ref64, eager = (torch.where(nan_ref, 0.0, t) for t in (out, ref64, eager))
    bound = 2 * (eager - ref64).abs() + atol * (1 + ref64.abs())
    err = (out - ref64).abs()
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{what}: error exceeds rule by {worst:.3g} (max err {err.max().item():.3g})"
