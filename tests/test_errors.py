"""Bad input gets a clear error naming the argument."""

import pytest
import torch

import fastdpo


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
