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
