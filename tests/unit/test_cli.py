"""The front door: ``prelora COMMAND`` runs the command's own ``main``, and
every command keeps the exit-code convention (2 for usage/config errors)."""

from __future__ import annotations

import importlib
import shutil
import subprocess

import pytest

from prelora_hpc.cli import COMMANDS, main


def test_every_command_resolves_to_its_main():
    for name, (module, func, summary) in COMMANDS.items():
        assert callable(getattr(importlib.import_module(module), func)), name
        assert summary


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: prelora COMMAND" in capsys.readouterr().err
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prelora: unknown command 'trian' (choose from "
                   + ", ".join(COMMANDS) + ")"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help_through_the_front_door(name, capsys):
    assert main([name, "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["train"], ["export"], ["report", "--no-such-option"],
                                  ["bench", "--no-such-option"], ["compare", "--bogus"],
                                  ["convert"]])
def test_usage_errors_exit_2_through_the_front_door(argv, capsys):
    assert main(argv) == 2


def test_a_missing_run_directory_is_named_in_one_line(tmp_path, capsys):
    missing = tmp_path / "no-run"
    assert main(["export", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]


def test_the_installed_front_door_matches_the_alias():
    exe = shutil.which("prelora")
    if exe is None:
        pytest.skip("the prelora console script is not installed (pip install -e .)")
    p = subprocess.run([exe, "nope"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown command 'nope'" in p.stderr
