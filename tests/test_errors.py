"""Bad input gets a clear error naming the argument, raised before dispatch: the same on every
backend."""

import math

import pytest
import torch

import fastdpo
from fastdpo import _validate


def ok():
    return torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))


@pytest.mark.parametrize("fn", [fastdpo.token_logps, fastdpo.sequence_logps])
def test_errors(fn):
    x, y = ok()
    with pytest.raises(ValueError, match="labels must have shape"):
        fn(x, y[:, :2])
    with pytest.raises(TypeError, match="logits must be a floating"):
        fn(x.long(), y)
    with pytest.raises(TypeError, match="labels must be an int32 or int64"):
        fn(x, y.float())
    with pytest.raises(ValueError, match="unit stride along the vocabulary"):
        fn(x.transpose(1, 2).contiguous().transpose(1, 2), y)
    with pytest.raises(ValueError, match="logits must be"):
        fn(x[0, 0], y[0, 0])
    with pytest.raises(ValueError, match="labels must lie in"):
        fn(x, torch.full_like(y, 5))
    with pytest.raises(ValueError, match="temperature"):
        fn(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fn(x, y, backend="cuda-magic")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="labels is on"):
            fn(x.cuda(), y)


def test_sequence_errors():
    x, y = ok()
    with pytest.raises(ValueError, match="token_weights must have the shape"):
        fastdpo.sequence_logps(x, y, token_weights=torch.ones(2, 2))
    with pytest.raises(TypeError, match="token_weights must be a floating"):
        fastdpo.sequence_logps(x, y, token_weights=torch.ones(2, 3, dtype=torch.long))
    flat_x, flat_y = x.reshape(6, 5), y.reshape(6)
    for cu, msg in [([0, 4, 3, 6], "non-decreasing"), ([0, 2, 5], "end at the total"),
                    ([1, 6], "start at 0")]:
        with pytest.raises(ValueError, match=msg):
            fastdpo.sequence_logps(flat_x, flat_y, cu_seqlens=torch.tensor(cu, dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32"):
        fastdpo.sequence_logps(flat_x, flat_y, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="packed batch"):
        fastdpo.sequence_logps(x, y, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))


def test_forced_backend_dtype():
    x, y = ok()
    with pytest.raises(TypeError, match="does not take logits of dtype"):
        fastdpo.token_logps(x.double(), y, backend="native")


# ------------------------------------------------------------ the same error on every backend


def _calls(backend):
    """Each public function with good arguments; ``kw`` overrides one of them."""
    x, y = ok()
    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)

    def args(kw):
        return {"backend": backend, **kw}

    return {
        "token_logps": lambda **kw: fastdpo.token_logps(x, y, **args(kw)),
        "sequence_logps": lambda **kw: fastdpo.sequence_logps(x, y, **args(kw)),
        "linear_token_logps": lambda **kw: fastdpo.linear_token_logps(h, w, y, **args(kw)),
        "linear_sequence_logps": lambda **kw: fastdpo.linear_sequence_logps(h, w, y, **args(kw)),
    }


COMMON = [
    ({"temperature": True}, TypeError, "temperature must be a real number"),
    ({"temperature": "1.0"}, TypeError, "temperature must be a real number"),
    ({"temperature": torch.tensor(1.0)}, TypeError, "temperature must be a real number"),
    ({"temperature": math.inf}, ValueError, "temperature must be finite"),
    ({"temperature": math.nan}, ValueError, "temperature must be finite"),
    ({"temperature": -1.0}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": 0}, ValueError, "temperature must be a finite number > 0"),
    ({"temperature": 1e-40}, ValueError, "temperature must be at least"),
    ({"ignore_index": None}, TypeError, "ignore_index must be an integer"),
    ({"ignore_index": -100.0}, TypeError, "ignore_index must be an integer"),
    ({"ignore_index": True}, TypeError, "ignore_index must be an integer"),
    ({"ignore_index": 2 ** 70}, ValueError, "ignore_index must be an integer in"),
    ({"shift": 2}, TypeError, "shift must be True or False"),
    ({"validate": 1}, TypeError, "validate must be True or False"),
    ({"validate": "yes"}, TypeError, "validate must be True or False"),
    ({"backend": "chunked"}, ValueError, "backend must be one of 'auto', 'torch'"),
    ({"backend": "Torch"}, ValueError, "backend must be one of"),
    ({"backend": None}, ValueError, "backend must be one of"),
]
PER_FUNCTION = {
    "token_logps": [({"return_entropy": 1}, TypeError, "return_entropy must be True or False"),
                    ({"inplace_backward": 1}, TypeError, "inplace_backward must be True or")],
    "sequence_logps": [({"average": 1}, TypeError, "average must be True or False"),
                       ({"average": None}, TypeError, "average must be True or False"),
                       ({"inplace_backward": 0}, TypeError, "inplace_backward must be True or")],
    "linear_token_logps": [({"return_entropy": 0}, TypeError, "return_entropy must be True or"),
                           ({"logit_scale": 0.0}, ValueError, "logit_scale must be non-zero"),
                           ({"logit_scale": math.inf}, ValueError, "logit_scale must be finite"),
                           ({"logit_scale": True}, TypeError, "logit_scale must be a real"),
                           ({"softcap": 0.0}, ValueError, "softcap must be a finite number > 0"),
                           ({"softcap": -30.0}, ValueError, "softcap must be a finite number > 0"),
                           ({"softcap": math.inf}, ValueError, "softcap must be finite"),
                           ({"softcap": True}, TypeError, "softcap must be a real number")],
    "linear_sequence_logps": [({"average": 1.0}, TypeError, "average must be True or False"),
                              ({"return_entropy": 1}, TypeError, "return_entropy must be True"),
                              ({"softcap": math.nan}, ValueError, "softcap must be finite")],
}


@pytest.mark.parametrize("name", list(PER_FUNCTION))
def test_scalar_arguments_same_error_every_backend(backend, name):
    call = _calls(backend)[name]
    call()  # the good arguments work
    for kw, exc, msg in COMMON + PER_FUNCTION[name]:
        with pytest.raises(exc, match=msg):
            call(**kw)


def test_numpy_scalars_are_numbers(backend):
    np = pytest.importorskip("numpy")
    x, y = ok()
    ref = fastdpo.token_logps(x, y, temperature=0.5, ignore_index=-1, backend=backend)
    out = fastdpo.token_logps(x, y, temperature=np.float32(0.5), ignore_index=np.int64(-1),
                              backend=backend)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("where", ["meta", "cuda"])
def test_cu_seqlens_on_another_device(backend, where):
    if where == "cuda" and not torch.cuda.is_available():
        where = "meta"
    x, y = ok()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=where)
    h, w = torch.randn(6, 4), torch.randn(5, 4)
    for shift in (False, True):
        with pytest.raises(ValueError, match=f"cu_seqlens is on {where}"):
            fastdpo.sequence_logps(x.reshape(6, 5), y.reshape(6), cu_seqlens=cu, shift=shift,
                                   backend=backend)
        with pytest.raises(ValueError, match=f"cu_seqlens is on {where}"):
            fastdpo.linear_sequence_logps(h, w, y.reshape(6), cu_seqlens=cu, shift=shift,
                                          backend=backend)


def test_token_weights_on_another_device(backend):
    x, y = ok()
    with pytest.raises(ValueError, match="token_weights is on meta"):
        fastdpo.sequence_logps(x, y, token_weights=torch.ones(2, 3, device="meta"),
                               backend=backend)


def test_inplace_backward_refuses_overlapping_logits(backend):
    y = torch.randint(0, 5, (2, 3))
    row = torch.randn(2, 1, 5, requires_grad=True)
    x = row.expand(2, 3, 5)  # three positions share one row of memory
    with pytest.raises(ValueError, match="overlap"):
        fastdpo.token_logps(x, y, inplace_backward=True, backend=backend)
    # not in place, the same view is fine: the gradient sums over the three positions
    fastdpo.token_logps(x, y, backend=backend).sum().backward()
    assert row.grad.shape == row.shape and torch.isfinite(row.grad).all()


def test_inplace_backward_accepts_views_that_do_not_overlap(backend):
    y = torch.randint(0, 5, (2, 3))
    base = torch.randn(3, 2, 5)
    for x in (base.transpose(0, 1), torch.randn(2, 4, 5)[:, 1:]):
        ref = fastdpo.token_logps(x, y, backend=backend)
        out = fastdpo.token_logps(x.clone(), y, inplace_backward=True, backend=backend)
        assert torch.equal(out, ref)


# ------------------------------------------------------------ the validators themselves


def test_number_validators():
    assert _validate.check_finite("a", 2) == 2.0 and _validate.check_finite("a", -1.5) == -1.5
    assert _validate.check_positive_finite("beta", 0.1) == 0.1
    for bad, exc in [(True, TypeError), ("1", TypeError), (None, TypeError),
                     (torch.tensor(1.0), TypeError), (math.inf, ValueError),
                     (math.nan, ValueError)]:
        with pytest.raises(exc, match="^beta must"):
            _validate.check_positive_finite("beta", bad)
    with pytest.raises(ValueError, match="beta must be a finite number > 0, got 0.0"):
        _validate.check_positive_finite("beta", 0)
    assert _validate.check_int("k", 3, minimum=1) == 3
    with pytest.raises(ValueError, match=r"k must be an integer in \[1,"):
        _validate.check_int("k", 0, minimum=1)
    for bad in (1.0, True, None):
        with pytest.raises(TypeError, match="k must be an integer"):
            _validate.check_int("k", bad)
    assert _validate.check_bool("flag", False) is False
    assert _validate.check_optional_bool("validate", None) is None
    for bad in (0, 1, 2, None, "True", torch.tensor(True)):
        with pytest.raises(TypeError, match="flag must be True or False"):
            _validate.check_bool("flag", bad)
    assert _validate.check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="mode must be one of 'a', 'b'; got 'c'"):
        _validate.check_choice("mode", "c", ("a", "b"))


def test_require_eager():
    _validate.require(torch.tensor(True), "never")
    with pytest.raises(ValueError, match="^target_probs must lie in"):
        _validate.require(torch.tensor(False), "target_probs must lie in [0, 1]")
    t = torch.tensor([0.2, float("nan")])
    with pytest.raises(ValueError):  # NaN fails a range condition
        _validate.require(((t >= 0) & (t <= 1)).all(), "target_probs must lie in [0, 1]")


def test_require_compiled():
    def f(t):
        _validate.require(((t >= 0) & (t <= 1)).all(), "target_probs must lie in [0, 1]")
        return t * 2

    torch._dynamo.reset()
    g = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(g(torch.tensor([0.5, 1.0])), torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match=r"target_probs must lie in \[0, 1\]"):
        g(torch.tensor([0.5, 1.7]))


def test_checked_mode(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("FASTDPO_CHECK", raising=False)
    assert _validate.checked_mode(None, cpu) and not _validate.checked_mode(None, cuda)
    assert _validate.checked_mode(True, cuda) and not _validate.checked_mode(False, cpu)
    monkeypatch.setenv("FASTDPO_CHECK", "1")
    assert _validate.checked_mode(None, cuda) and not _validate.checked_mode(False, cuda)
