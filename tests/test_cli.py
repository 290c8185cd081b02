"""The command line: every option documented, config files and flags combined, bad keys named."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from trainer.cli import build_parser, config_from_args, main
from trainer.config import TrainConfig
from trainer.methods.table import methods_table_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_train_help_documents_every_config_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "--config" in text


def test_toml_file_with_flags_overriding(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "mapo"\nmax_steps = 7\nlearning_rate = 1e-5\n[method_args]\nbeta = 0.2\n')
    args = build_parser().parse_args(["train", "--config", str(path), "--max-steps", "9", "--method-args", "snr_value=0.25"])
    config = config_from_args(args)
    assert (config.method, config.max_steps, config.learning_rate) == ("mapo", 9, 1e-5)
    assert config.method_args == {"beta": 0.2, "snr_value": 0.25}


@pytest.mark.parametrize("content, key", [("max_stepz = 3\n", "max_stepz"), ("max_steps = 'x'\n", "max_steps"),
                                          ("mixed_precision = 'fp8'\n", "mixed_precision")])
def test_bad_config_names_the_key(tmp_path, capsys, content, key):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert main(["train", "--config", str(path)]) == 2
    assert f"'{key}'" in capsys.readouterr().err


def test_unknown_method_option_names_it(tmp_path, capsys):
    code = main(["train", "--method", "dpo", "--method-args", "betta=3", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "method_args.betta" in capsys.readouterr().err


def test_methods_command_lists_every_method(capsys):
    from trainer.methods import method_names

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in method_names():
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name


def test_readme_methods_table_is_current():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- methods-table:start -->")[1].split("<!-- methods-table:end -->")[0]
    assert block.strip() == methods_table_markdown().strip()
