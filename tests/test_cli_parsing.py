"""The command line's shape: help and version without torch, --threads and --device on every command that
computes, and an argument error shown with the sub-command's own usage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dorafit.cli import COMMANDS, build_parser, main

#: the commands that run a model, and the arguments each needs besides the options under test
COMPUTING = {
    "train": [], "eval": ["RUN"], "generate": ["RUN", "--prompt", "hi"], "chat": ["RUN"], "serve": ["--model", "M"],
    "merge": ["RUN", "--out", "OUT"], "export": ["RUN", "--out", "OUT"], "analyze": ["RUN", "--out", "OUT"],
    "bench": [],
}

PROBE = """
import json, sys
from dorafit.cli import COMMANDS, main
loaded = {}
for argv in [["--version"], ["--help"]] + [[name, "--help"] for name in COMMANDS]:
    try:
        main(argv)
    except SystemExit:
        pass
    loaded[" ".join(argv)] = [m for m in ("torch", "transformers", "numpy") if m in sys.modules]
print(json.dumps(loaded), file=sys.stderr)
"""


def test_help_and_version_import_no_torch():
    """In a fresh interpreter: after each of them, neither torch nor transformers (nor numpy) has been imported."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stderr.strip().splitlines()[-1])
    assert len(loaded) == 2 + len(COMMANDS)
    assert {argv: heavy for argv, heavy in loaded.items() if heavy} == {}


def test_every_command_is_a_computing_one_or_known():
    assert sorted(COMPUTING) == sorted(COMMANDS)


@pytest.mark.parametrize("command", list(COMPUTING))
def test_every_computing_command_takes_threads_and_device(command):
    args = build_parser().parse_args([command, *COMPUTING[command], "--threads", "3", "--device", "cpu"])
    assert args.threads == 3 and args.device == "cpu"


@pytest.mark.parametrize("command", ["merge", "export", "analyze", "eval"])
def test_an_argument_error_shows_the_commands_usage(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, *COMPUTING[command], "--no-such-option", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"usage: dorafit {command} ") and f"dorafit {command}: error: unrecognized arguments: " \
        "--no-such-option 1" in err


@pytest.mark.parametrize("value", ["0", "two"])
def test_threads_must_be_a_positive_whole_number(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "RUN", "--out", "OUT", "--threads", value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: dorafit merge ")
    assert f"argument --threads: must be a whole number of at least 1, got '{value}'" in err
