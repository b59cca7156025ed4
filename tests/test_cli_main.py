"""CLI errors are one line (no traceback) and exit with status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lvit.commands.cli import main

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--config", "no/such.yaml", "--data", ".", "--out", "{tmp}/r"], "no/such.yaml"),
        (["train", "--config", "synth", "--data", ".", "--out", "{tmp}/r", "--set", "model.bogus=1"], "bogus"),
        (["train", "--config", "synth", "--data", ".", "--out", "{tmp}/r", "--set", "optim.lr=nan"], "finite"),
        (["train", "--config", "synth", "--data", "{tmp}/missing", "--out", "{tmp}/r"], "missing"),
        (["train", "--out", "{tmp}/r", "--resume"], "nothing to resume"),
        (["train", "--config", "synth", "--out", "{tmp}/r", "--resume"], "--set instead of --config"),
        (["test", "{tmp}/not-a-run", "--data", "."], "not-a-run"),
        (["predict", "{tmp}/not-a-run", "--image", "x.png", "--out", "{tmp}/m.png"], "not-a-run"),
    ],
)
def test_errors_are_one_line(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert needle in one_line_error(capsys)


def test_bad_yaml_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert main(["train", "--config", str(bad), "--data", ".", "--out", str(tmp_path / "r")]) == 2
    assert "invalid YAML" in one_line_error(capsys)
    bad.write_text("optim:\n  lr: .nan\n")
    assert main(["train", "--config", str(bad), "--data", ".", "--out", str(tmp_path / "r")]) == 2
    assert "optim.lr" in one_line_error(capsys)


def test_console_script_reports_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lvit", "test", str(tmp_path / "nope"), "--data", "."],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and proc.stderr.strip().count("\n") == 0, proc.stderr


# --help: argparse itself ignores a failed write and exits 0; a command's output ends with 141 (128 + SIGPIPE).
@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["model-info", "--config", "synth"], 141)])
def test_a_reader_that_goes_away_ends_the_command_quietly(argv, status):
    """`lvit ... | head`: the pipe closes before lvit writes; no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "lvit", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == status
    assert "Traceback" not in err and "BrokenPipe" not in err, err
