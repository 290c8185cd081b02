"""The command line: every option documented once, config files and flags combined, bad keys named,
required options, method arguments parsed in one place, the help and messages a person reads."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from trainer.cli import build_parser, config_from_args, main, resume_command
from trainer.config import TrainConfig
from trainer.methods.table import methods_table_markdown

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["--model", "tiny-sd", "--data", "tiny"]


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_train_help_documents_every_config_key_once(capsys):
    text = help_text(capsys, "train")
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
        if "_" in f.name:  # `--max_steps`, `--no-keep_ties` are accepted but not shown
            assert f"-{f.name}" not in text, f.name
    assert "--config" in text
    usage = text.split("\n\n")[0]
    assert "[--keep-ties | --no-keep-ties]" in usage and "keep_ties" not in usage  # one spelling, not four
    assert re.search(r"--model MODEL\s+.*\(required\)", " ".join(text.split()))


def test_field_default_is_the_value_a_key_takes_when_unset():
    from trainer.config import config_fields, field_default

    fields = {name: f for name, (f, _) in config_fields().items()}
    assert field_default(fields["model"]) is dataclasses.MISSING  # required
    assert field_default(fields["seed"]) == TrainConfig(model="m", data="d").seed
    method_args = field_default(fields["method_args"])  # from its factory: a fresh dict each time
    assert method_args == {} and method_args is not field_default(fields["method_args"])


def test_underscore_spellings_still_parse():
    args = build_parser().parse_args(["train", *REQUIRED, "--keep_ties", "--max_steps", "3", "--no-center_crop"])
    config = config_from_args(args)
    assert (config.keep_ties, config.max_steps, config.center_crop) == (True, 3, False)


def test_help_texts_say_what_the_program_does(capsys):
    demo = help_text(capsys, "demo")
    assert "95% intervals" in demo and "%%" not in demo
    train = " ".join(help_text(capsys, "train").split())
    assert "~/.cache/prefalign/encodings" in train and "OUTPUT/../.cache" not in train
    assert "130" in train  # what Ctrl-C does and the exit code it gives


def test_toml_file_with_flags_overriding(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "toy"\ndata = "d"\nmethod = "mapo"\nmax_steps = 7\nlearning_rate = 1e-5\n'
                    '[method_args]\nbeta = 0.2\n')
    args = build_parser().parse_args(["train", "--config", str(path), "--max-steps", "9", "--method-args", "snr_value=0.25"])
    config = config_from_args(args)
    assert (config.method, config.max_steps, config.learning_rate) == ("mapo", 9, 1e-5)
    # the resolved hyper-parameters: the two set, and the default of the third
    assert config.method_args == {"beta": 0.2, "snr_value": 0.25, "num_train_timesteps": 1000}


@pytest.mark.parametrize("content, key", [("max_stepz = 3\n", "max_stepz"), ("max_steps = 'x'\n", "max_steps"),
                                          ("mixed_precision = 'fp8'\n", "mixed_precision")])
def test_bad_config_names_the_key(tmp_path, capsys, content, key):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert main(["train", *REQUIRED, "--config", str(path)]) == 2
    assert f"'{key}'" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["model", "data"])
def test_model_and_data_are_required(tmp_path, monkeypatch, capsys, missing):
    """Plain `train` used to train the tiny test model on built-in data for 1000 steps at 512 px."""
    monkeypatch.chdir(tmp_path)
    given = {"model": ["--model", "toy"], "data": ["--data", "tiny"]}
    argv = ["train"] + [a for key, flags in given.items() if key != missing for a in flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config key '{missing}': required (--{missing}") and err.count("\n") == 1
    assert "python -m trainer demo" in err
    assert list(tmp_path.iterdir()) == []  # no `out/` folder
    assert main(["train"]) == 2 and "'model': required" in capsys.readouterr().err


def test_method_args_are_parsed_and_checked_in_one_place(tmp_path, capsys):
    from trainer.methods.args import parse_method_args, read_method_args, resolve_method_args

    # a command line's KEY=VALUE items, the node's TOML lines and a JSON object read alike
    assert read_method_args(["beta=2500", "space=ncp"]) == read_method_args("beta = 2500\nspace = 'ncp'") \
        == read_method_args('{"beta": 2500, "space": "ncp"}') == {"beta": 2500, "space": "ncp"}
    assert read_method_args("# beta = (automatic)\n\nloss_type = hinge  \n") == {"loss_type": "hinge"}
    assert parse_method_args("dpo", "beta = 100") == {"beta": 100.0}
    with pytest.raises(ValueError, match=r"method_args.beta: expected float, got 'abc'"):
        parse_method_args("dpo", ["beta=abc"])
    with pytest.raises(ValueError, match="TOML"):
        read_method_args(["beta=="])
    assert resolve_method_args("dspo", {"variant": "sdxl"}) == {"variant": "sdxl", "beta": 5000.0, "sdxl_threshold": 0.1}
    # the command line refuses a wrong type by its key, before anything loads
    assert main(["train", *REQUIRED, "--method-args", "beta=abc", "--output-dir", str(tmp_path / "o")]) == 2
    assert "method_args.beta: expected float" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_method_option_names_it(tmp_path, capsys):
    code = main(["train", *REQUIRED, "--method", "dpo", "--method-args", "betta=3", "--output-dir", str(tmp_path)])
    assert code == 2
    assert "method_args.betta" in capsys.readouterr().err


def test_methods_command_lists_every_method_and_explains_its_columns(capsys):
    from trainer.methods import method_names

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in method_names():
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
    assert re.search(r"^reference: yes = .*frozen base model.*no = reference-free", out, re.M)
    assert "space=ncp" in out


def test_readme_methods_table_is_current():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- methods-table:start -->")[1].split("<!-- methods-table:end -->")[0]
    assert block.strip() == methods_table_markdown().strip()


def test_readme_counts_the_methods_and_ci_names_a_real_section():
    from trainer.methods import method_names

    readme = (ROOT / "README.md").read_text()
    words = {10: "ten"}
    assert f"any of {words[len(method_names())]} alignment methods" in readme and "nine alignment" not in readme
    section = re.search(r'README, "([^"]+)"', (ROOT / ".ci" / "run").read_text()).group(1)
    assert re.search(rf"^#+ {re.escape(section)}$", readme, re.M), section


def test_resume_command_repeats_the_options_with_resume_latest():
    argv = ["train", "--config", "my run.toml", "--resume", "checkpoints/step-4", "--overwrite", "--max-steps=9"]
    assert resume_command(argv) == "python -m trainer train --config 'my run.toml' --max-steps=9 --resume latest"
    assert resume_command(["train", "--resume=latest", "--data", "d"]) == "python -m trainer train --data d --resume latest"


def test_eval_summary_counts_in_words_and_says_where_it_wrote():
    from trainer.evaluate import summary, win_rate
    from dataclasses import asdict

    result = {"name": "clip:x", "labelled": None, "binary": False, "mean_base": 1.0, "mean_lora": 2.0,
              "win_rate": asdict(win_rate([2.0, 1.0, 0.0], [1.0, 1.0, 1.0]))}
    report = {"samples": 3, "lora": "l.safetensors", "model": "toy", "results": [result],
              "files": ["runs/eval/eval.json", "runs/eval/grid.png"]}
    text = summary(report)
    assert "1 win, 1 tie, 1 loss" in text
    assert "wrote runs/eval/eval.json and runs/eval/grid.png" in text
    result["win_rate"] = asdict(win_rate([1.0, 0.0, 0.0], [1.0, 0.0, 1.0]))
    assert "0 wins, 2 ties, 1 loss" in summary(report)
