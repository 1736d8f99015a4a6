"""The plain-loop example of the reference-free and unpaired losses runs and learns."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("loss", ["simpo", "orpo", "kto"])
def test_reference_free_and_kto_example_learns(loss, capsys):
    spec = importlib.util.spec_from_file_location(
        "reference_free_and_kto", ROOT / "examples" / "reference_free_and_kto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    metrics = mod.main(["--loss", loss, "--steps", "12", "--threads", "1"])
    assert metrics["rewards/margins"] > 0  # chosen (or desirable) above rejected after training
    assert "step  11" in capsys.readouterr().out
