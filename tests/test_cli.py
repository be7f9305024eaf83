"""The command line's own surface: --help lists every config key, config show, --version, override forms."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

import paratrain
from paratrain.cli import main
from paratrain.config import Config
from paratrain.config_docs import sections


def test_train_help_explains_overrides_and_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--section.key=VALUE" in out and "--section.key VALUE" in out and "docs/config.md" in out
    for s in sections():
        assert f"[{s.name}]" in out
        for k in s.keys:
            assert f"--{s.name}.{k.key}=" in out, k
    assert '--train.lr=0.003' in out and "(float, 0.0 .. 10.0) peak learning rate" in out
    assert '--parallel.sync="allreduce"' in out and '"allreduce" | "ps"' in out


def test_config_show_prints_the_resolved_config(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 7\n[ps]\nsecret = "0123456789abcdef0123"\n')
    assert main(["config", "show", str(path), "--train.lr", "1e-3", "--parallel.sync=ps"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    expected = Config.load(path, ["--train.lr=1e-3", "--parallel.sync=ps"]).to_dict()
    expected["ps"]["secret"] = ""  # never printed or written
    assert shown == expected
    assert shown["train"]["steps"] == 7 and shown["train"]["lr"] == 1e-3 and shown["parallel"]["sync"] == "ps"
    assert main(["config", "show"]) == 0
    assert tomllib.loads(capsys.readouterr().out) == Config.default().to_dict()
    assert main(["config", "show", "-c", str(path)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["train"]["steps"] == 7


@pytest.mark.parametrize("argv, message", [
    (["config", "show", "--train.lrr=1"], "did you mean 'lr'"),
    (["config", "show", "--train.steps"], "has no value"),
    (["config", "shw"], "invalid choice"),
    (["config", "show", "a.toml", "-c", "b.toml"], "give the config file once"),
    (["train", "--train.deterministic", "--json"], "has no value"),
])
def test_config_and_override_mistakes_are_one_line_and_exit_2(argv, message, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"paratrain {paratrain.__version__}"


def test_console_entry_point_runs_as_a_module() -> None:
    """`python -m paratrain.cli` (what torchrun runs) gives the same --version and exit codes."""
    ok = subprocess.run([sys.executable, "-m", "paratrain.cli", "--version"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip() == f"paratrain {paratrain.__version__}"
    bad = subprocess.run([sys.executable, "-m", "paratrain.cli", "config", "show", "--model.arch", "gtp"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "did you mean 'gpt'" in bad.stderr and "Traceback" not in bad.stderr
