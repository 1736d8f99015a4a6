"""The TRL training-step bench (``fastdpo bench --preset trl-step``, :mod:`fastdpo.bench.trainer`):
the three trainers step the same batch from the same weights, each route is the one it names,
and the job writes its files. Tiny sizes, two repeats."""

import json

import pytest
import torch

import peers

peers.require("trl", "datasets")
from fastdpo.bench import trainer  # noqa: E402
from matmul_count import MatmulFlops  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_routes_and_equal_losses(tmp_path, monkeypatch):
    from fastdpo.integrations import trl_metrics

    tiled_calls = []
    real = trl_metrics.logit_stats
    monkeypatch.setattr(trl_metrics, "logit_stats",
                        lambda *a, **k: tiled_calls.append(1) or real(*a, **k))
    case = trainer.TINY[0]
    built = {name: trainer.build(name, case, str(tmp_path)) for name in trainer.IMPLS}
    fused, metrics_pass, logp_pass, tiled, trl = (built[n][0] for n in trainer.IMPLS)
    assert fused._fused_loss() and metrics_pass._fused_loss()
    assert not logp_pass._fused_loss() and not tiled._fused_loss()
    assert type(trl).__name__ == "DPOTrainer"
    losses, macs, metrics = {}, {}, {}
    for name, (tr, batch) in built.items():
        n_tiled = len(tiled_calls)
        with MatmulFlops(case.vocab) as fm:
            losses[name] = trainer.step(tr, batch, name)
        assert (len(tiled_calls) > n_tiled) == (name == trainer.TILED), name
        macs[name] = fm.macs
        metrics[name] = {k: v[-1] for k, v in tr._metrics["train"].items()}
    first = losses[trainer.IMPLS[0]]
    assert all(abs(v - first) < 1e-5 for v in losses.values()), losses
    # the fused loss saves one of the log-prob pass's head matmuls, and the metrics from its
    # own row statistics the metrics pass's one
    _, batch = built[trainer.IMPLS[0]]
    rows = int(batch["completion_mask"][:, 1:].sum())
    one = rows * case.hidden * case.vocab
    assert macs["FastDPOTrainer[metrics pass]"] - macs["FastDPOTrainer"] == one, macs
    assert macs["FastDPOTrainer[log-prob pass]"] - macs["FastDPOTrainer"] == 2 * one, macs
    assert macs[trainer.TILED] == macs["FastDPOTrainer[log-prob pass]"], macs
    # the tiled metrics really ran (the patch is undone after the step) and agree
    from fastdpo.integrations import trl as trl_mod
    from fastdpo.integrations.trl_metrics import token_stats
    assert trl_mod.token_stats is token_stats
    for k in ("logits/chosen", "mean_token_accuracy", "entropy"):
        for other in (trainer.TILED, "FastDPOTrainer[metrics pass]", "trl.DPOTrainer"):
            a, b = metrics[other][k], metrics["FastDPOTrainer"][k]
            assert abs(a - b) <= 1e-4 * abs(b) + 1e-6, (k, other, a, b)


def test_job_writes_rows_and_files(tmp_path):
    obj = trainer.trainer_job(tmp_path, cases=trainer.TINY, repeats=2, log=lambda *a: None)
    rows = obj["rows"]
    assert [r["impl"] for r in rows] == list(trainer.IMPLS)
    for r in rows:
        assert len(r["samples_s"]) == 2 and r["median_s"] > 0 and r["first"] == trainer.IMPLS[0]
    assert rows[0]["vs_first"] == 1.0
    saved = json.loads((tmp_path / "trl-step-latest.json").read_text())
    assert saved["kind"] == "trl-step" and saved["machine"]["cpu_count"] >= 1
    assert (tmp_path / "trl-step-latest.csv").exists()
    assert "FastDPOTrainer" in (tmp_path / "trl-step-table-latest.txt").read_text()


def test_cli_refuses_options_the_trainer_job_ignores():
    from fastdpo.cli.main import main

    for extra in (["--impl", "eager"], ["--busy", "1"], ["--workload", "x"]):
        with pytest.raises(SystemExit, match=extra[0]):
            main(["bench", "--preset", "trl-step", *extra])
