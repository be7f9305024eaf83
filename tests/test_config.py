"""Config loading, overrides and validation; every user mistake is one line and exit code 2."""

from __future__ import annotations

import tomllib

import pytest

from paratrain.cli import main
from paratrain.config import Config, ConfigError, parse_override


def test_defaults_validate_and_round_trip_through_toml():
    cfg = Config.default()
    again = Config.from_dict(tomllib.loads(cfg.to_toml()))
    assert again.to_dict() == cfg.to_dict()


def test_overrides_are_toml_literals_or_bare_strings():
    assert parse_override("--train.lr=3e-4") == ("train", "lr", 3e-4)
    assert parse_override("--parallel.sync=ps") == ("parallel", "sync", "ps")
    assert parse_override('--parallel.sync="ps"') == ("parallel", "sync", "ps")
    assert parse_override("--train.deterministic=true") == ("train", "deterministic", True)
    cfg = Config.load(None, ["--train.lr=1e-3", "--model.n_layer=2"])
    assert cfg.train.lr == 1e-3 and cfg.model.n_layer == 2


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert Config.load(None, ["--train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="must be an integer"):
        Config.load(None, ["--train.steps=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--trian.lr=1", "did you mean 'train'"),
        ("--train.lrr=1", "did you mean 'lr'"),
        ("--train.steps=abc", "must be an integer"),
        ("--train.lr=-1", "below its minimum"),
        ("--model.arch=gtp", "did you mean 'gpt'"),
        ("--model.n_head=3", "does not divide model.d_model"),
        ("--parallel.zero=4", "above its maximum"),
        ("--data.source=nothing", "data.source"),
        ("--data.seq_len=1000", "exceeds model.max_seq_len"),
        ("--parallel.dp=3", "make the product equal nproc"),
        ("--compression.powersgd_exchange=ring", "powersgd_exchange"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(override, message, capsys):
    assert main(["train", override]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_and_invalid_config_files(tmp_path, capsys):
    assert main(["train", "-c", str(tmp_path / "nope.toml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    assert main(["train", "-c", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[modle]\nn_layer = 2\n")
    assert main(["train", "-c", str(unknown)]) == 2
    assert "did you mean 'model'" in capsys.readouterr().err


def test_bad_cli_usage_is_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml")):
        Config.load(path)


def test_every_key_has_a_meaning():
    from paratrain.config_docs import undocumented

    missing = undocumented()
    assert not missing, (
        f"undocumented config: {', '.join(missing)}; in paratrain/config.py give each key a trailing "
        "`# comment` saying what it means (and each section class a docstring), then run "
        "`python -m paratrain.config_docs > docs/config.md`"
    )


def test_config_reference_is_up_to_date():
    from pathlib import Path

    from paratrain.config_docs import render_markdown

    doc = Path(__file__).parent.parent / "docs" / "config.md"
    assert doc.read_text() == render_markdown(), (
        "docs/config.md is out of date with paratrain/config.py; run `python -m paratrain.config_docs > docs/config.md`"
    )


def test_reference_reads_comments_ranges_and_choices():
    from paratrain.config_docs import sections

    keys = {(k.section, k.key): k for s in sections() for k in s.keys}
    assert len(keys) == sum(len(Config().to_dict()[s]) for s in Config().to_dict())
    lr = keys[("train", "lr")]
    assert (lr.type, lr.default, lr.allowed) == ("float", 3e-3, "0.0 .. 10.0") and "learning rate" in lr.meaning
    assert keys[("model", "arch")].allowed == '"gpt" | "llama" | "seq2seq" | "bert"'
    assert keys[("parallel", "nproc")].allowed == "1 .. 1024" and keys[("model", "n_layer")].allowed == ">= 1"
    assert keys[("run", "dir")].allowed == "" and keys[("train", "deterministic")].type == "bool"


def test_overrides_take_the_value_as_the_next_argument():
    cfg = Config.load(None, ["--train.lr", "1e-3", "--parallel.sync", "ps", "--debug.kill_rank", "-1",
                             "--model.n_layer=2", "train.steps=5"])
    assert (cfg.train.lr, cfg.parallel.sync, cfg.debug.kill_rank, cfg.model.n_layer, cfg.train.steps) == (
        1e-3, "ps", -1, 2, 5)
    with pytest.raises(ConfigError, match="has no value"):
        Config.load(None, ["--train.deterministic", "--train.lr=1"])
    with pytest.raises(ConfigError, match="has no value"):
        Config.load(None, ["--train.lr"])
    with pytest.raises(ConfigError, match="must look like --section.key=value"):
        Config.load(None, ["--json"])


def test_nan_is_refused():
    with pytest.raises(ConfigError, match="train.lr = nan is not a finite number"):
        Config.load(None, ["--train.lr=nan"])
