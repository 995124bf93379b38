"""The interactive chat and the help texts, driven through the CLI entry point."""

import io

import pytest

from moetier.cli import main


def test_chat_keeps_history_and_quits_on_empty_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):\nand subtract?\n\n"))
    assert main(["chat", "--max-tokens", "8", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert out.count("> ") == 3  # two turns answered, then the empty line ends the session
    answers = out.split("> ")[1:3]
    assert all(answer.strip() for answer in answers)


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "bench", "eval-ppl", "fit", "calibrate"])
def test_every_command_explains_its_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"moetier {command}" in out and "--help" in out
    if command in ("generate", "chat", "serve", "bench", "eval-ppl"):
        assert "--model" in out and "--max-model-len" in out and "--gpu-memory" in out


def test_generate_stats_table_for_offloaded_experts(capsys):
    assert main(["generate", "def f(x):", "--max-tokens", "6", "--expert-slots", "10", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "experts: offloaded, 10 device slots" in err and "hit rate" in err
    assert "next-layer prediction: precision" in err  # the gate predictor guesses by default
    assert "first misses copied by the GPU 0" in err  # CPU: no graphs, no first-miss kernel
    layer_rows = [line.split() for line in err.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in layer_rows] == list(range(8))  # the default model's 8 MoE layers
    assert all(int(row[1]) + int(row[2]) > 0 for row in layer_rows)
