"""``fastdpo info``: versions, every backend with its availability (or the reason), and auto."""

import json

from fastdpo.cli.main import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["torch"] and info["versions"]["fastdpo"]
    table = info["backends"]
    assert table["torch@cpu"] == "available"
    for name in ("triton", "native"):
        assert table[f"{name}@cpu"] == "available" or table[f"{name}@cpu"].startswith("unavailable: ")
    assert table["auto@cpu"] in ("native", "torch")


def test_unknown_command_exits_nonzero(capsys):
    try:
        code = main(["frobnicate"])
    except SystemExit as exc:  # argparse reports the bad choice
        code = exc.code
    assert code != 0
