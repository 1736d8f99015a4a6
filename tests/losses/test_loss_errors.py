"""Bad arguments fail early with a message naming the problem."""

import pytest
import torch

import fastdpo.losses as L

B = 4


def logps(dtype=torch.float32):
    return [torch.randn(B, dtype=dtype) for _ in range(4)]


def call(*args, **kw):
    return L.dpo_loss(*(args or logps()), **kw)


def test_shape_and_type_errors():
    pc, pr, rc, rr = logps()
    with pytest.raises(ValueError, match="policy_rejected_logps must have the shape"):
        L.dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps must have the shape"):
        L.dpo_loss(pc, pr, rc, rr[None])
    with pytest.raises(ValueError, match="1-D"):
        L.dpo_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(ValueError, match="non-empty"):
        L.dpo_loss(pc[:0], pr[:0], rc[:0], rr[:0])
    with pytest.raises(TypeError, match="ref_chosen_logps must be a floating"):
        L.dpo_loss(pc, pr, rc.long(), rr)
    with pytest.raises(TypeError, match="torch.Tensor"):
        L.dpo_loss(pc, pr, [0.0] * B, rr)


@pytest.mark.parametrize("beta,exc", [(0.0, ValueError), (-0.1, ValueError),
                                      (float("nan"), ValueError), (float("inf"), ValueError),
                                      ("0.1", TypeError), (None, TypeError), (True, TypeError)])
def test_beta(beta, exc):
    with pytest.raises(exc, match="beta"):
        call(beta=beta)


def test_unknown_loss_type_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        call(loss_type="kto")
    for t in L.LOSS_TYPES:
        assert t in str(e.value)
    with pytest.raises(ValueError, match="at least one"):
        call(loss_type=[])
    with pytest.raises(ValueError, match="one weight per loss type"):
        call(loss_type=["sigmoid", "ipo"], loss_weights=[1.0])


def test_reduction():
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="avg")


def test_soft_targets():
    with pytest.raises(ValueError, match="needs target_probs"):
        call(loss_type="soft")
    for bad in (torch.tensor([0.5, 1.2, 0.1, 0.0]), torch.tensor([0.5, -1e-3, 0.1, 0.0]),
                torch.tensor([0.5, float("nan"), 0.1, 0.0])):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            call(loss_type="soft", target_probs=bad)
    with pytest.raises(ValueError, match="shape"):
        call(loss_type="soft", target_probs=torch.full((B + 1,), 0.5))
    with pytest.raises(ValueError, match="only used by loss_type='soft'"):
        call(loss_type="sigmoid", target_probs=torch.full((B,), 0.5))
    # the range check is a host sync: validate=False skips it (CUDA's default)
    call(loss_type="soft", target_probs=torch.full((B,), 2.0), validate=False)


def test_distill_margins():
    with pytest.raises(ValueError, match="needs reward_margins"):
        call(loss_type="distill")
    with pytest.raises(ValueError, match="finite"):
        call(loss_type="distill", reward_margins=torch.tensor([0.0, float("inf"), 1.0, 2.0]))
    with pytest.raises(ValueError, match="only used by loss_type='distill'"):
        call(reward_margins=torch.zeros(B))
    with pytest.raises(TypeError, match="reward_margins must be a floating"):
        call(loss_type="distill", reward_margins=torch.zeros(B, dtype=torch.long))


@pytest.mark.parametrize("loss_type,eps", [("robust", 0.5), ("robust", -0.1), ("exo_pair", 0.0),
                                           ("exo_pair", 1.0), ("aot", 1.5), ("sigmoid", 0.1),
                                           ("soft", 0.1), ("ipo", 0.2)])
def test_label_smoothing_ranges(loss_type, eps):
    kw = {"target_probs": torch.full((B,), 0.5)} if loss_type == "soft" else {}
    with pytest.raises(ValueError, match="label_smoothing"):
        call(loss_type=loss_type, label_smoothing=eps, **kw)


def test_label_smoothing_accepted_where_used():
    call(loss_type="robust", label_smoothing=0.49)
    call(loss_type="exo_pair", label_smoothing=1e-3)
    call(loss_type="aot_unpaired", label_smoothing=1.0)
    call(loss_type=["sigmoid", "robust"], label_smoothing=0.1)  # used by one of them


def test_lengths_and_f_divergence():
    with pytest.raises(ValueError, match="sft' needs chosen_lengths"):
        call(loss_type="sft")
    with pytest.raises(ValueError, match="both chosen_lengths and rejected_lengths"):
        call(loss_type="ipo", chosen_lengths=torch.ones(B))
    with pytest.raises(ValueError, match="chosen_lengths must have shape"):
        call(loss_type="ipo", chosen_lengths=torch.ones(B + 1), rejected_lengths=torch.ones(B))
    with pytest.raises(ValueError, match="f_divergence_type"):
        call(f_divergence_type="tv")
    with pytest.raises(ValueError, match="only supported for"):
        call(loss_type="nca_pair", f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="discopop_tau"):
        call(loss_type="discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="bco_delta is only used"):
        call(bco_delta=0.1)


def test_device_mismatch_is_reported():
    pc, pr, rc, rr = logps()
    meta = torch.empty(B, device="meta")
    with pytest.raises(ValueError, match="is on meta"):
        L.dpo_loss(pc, pr, rc, meta)


def test_preference_helpers_errors():
    r = torch.randn(3, 5)
    with pytest.raises(ValueError, match="same shape"):
        L.preference_probs(r[0], r[1, :4])
    with pytest.raises(ValueError, match="ensemble"):
        L.preference_probs(r[0], r[1], ensemble="median")
    with pytest.raises(ValueError, match="temperature"):
        L.preference_probs(r[0], r[1], temperature=0)
    with pytest.raises(ValueError, match="quantile"):
        L.preference_probs(r, r, ensemble="lower_quantile", quantile=1.5)
    with pytest.raises(ValueError, match=r"\(P, K\)"):
        L.rejection_sample(r[0], 1.0, 2)
    with pytest.raises(ValueError, match="beta"):
        L.rejection_sample(r, 0.0, 2)
    with pytest.raises(ValueError, match="num_samples"):
        L.rejection_sample(r, 1.0, 0)
    with pytest.raises(ValueError, match="NaN"):
        L.rejection_sample(torch.tensor([[0.0, float("nan")]]), 1.0, 1)
    with pytest.raises(ValueError, match="strategy"):
        L.build_pairs(r, strategy="random")
    with pytest.raises(ValueError, match="margin"):
        L.build_pairs(r, margin=-1.0)


@pytest.mark.parametrize("kw,exc,name", [
    ({"loss_type": None}, TypeError, "loss_type"),
    ({"loss_type": 3}, TypeError, "loss_type"),
    ({"loss_type": ["sigmoid", None]}, TypeError, "loss_type"),
    ({"loss_type": b"sigmoid"}, TypeError, "loss_type"),
    ({"loss_weights": 1.0}, TypeError, "loss_weights"),
    ({"loss_weights": "1"}, TypeError, "loss_weights"),
    ({"loss_weights": [None]}, TypeError, r"loss_weights\[0\]"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, float("nan")]}, ValueError,
     r"loss_weights\[1\]"),
    ({"reduction": None}, ValueError, "reduction"),
    ({"f_divergence_type": None}, ValueError, "f_divergence_type"),
    ({"label_smoothing": None}, TypeError, "label_smoothing"),
    ({"validate": "yes"}, TypeError, "validate"),
    ({"loss_type": "bco_pair", "bco_delta": "0.1"}, TypeError, "bco_delta"),
    ({"loss_type": "bco_pair", "bco_delta": float("inf")}, ValueError, "bco_delta"),
])
def test_bad_loss_arguments_name_the_argument(kw, exc, name):
    with pytest.raises(exc, match=name):
        call(**kw)
    if "bco_delta" not in kw:
        with pytest.raises(exc, match=name):  # the module checks at construction
            L.DPOLoss(**kw)


@pytest.mark.parametrize("kw,name", [
    ({"loss_type": "soft", "target_probs": torch.full((B,), 1.7)}, "target_probs"),
    ({"loss_type": "soft", "target_probs": torch.full((B,), float("nan"))}, "target_probs"),
    ({"loss_type": "distill", "reward_margins": torch.full((B,), float("inf"))}, "reward_margins"),
])
def test_validate_is_honoured_under_compile(kw, name):
    torch._dynamo.reset()
    pc, pr, rc, rr = logps()

    @torch.compile(backend="aot_eager")
    def f(pc, pr, rc, rr, t):
        key = "target_probs" if "target_probs" in kw else "reward_margins"
        return L.dpo_loss(pc, pr, rc, rr, loss_type=kw["loss_type"], validate=True,
                          **{key: t})[0]

    with pytest.raises((RuntimeError, ValueError), match=name):
        f(pc, pr, rc, rr, next(v for v in kw.values() if torch.is_tensor(v)))
    ok = torch.full((B,), 0.5)
    assert torch.isfinite(f(pc, pr, rc, rr, ok))  # valid targets still compile and run
