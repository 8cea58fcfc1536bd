"""Config mistakes through the real CLI: a one-line message on stderr that names the key (and the
valid keys, the close match, the expected type, the missing path and the `foundry prep` command),
exit code 2, no traceback, and nothing started or written."""
import pytest
import yaml

from conftest import RECIPE, REPO, run_cli
from ssl_foundry.launch.cli import main
from ssl_foundry.pipeline.config import ConfigError, load_config

TRAIN_KEYS = ["max_steps", "batch_size", "grad_accum_steps", "optimizer", "lr", "warmup_steps", "resume"]


def assert_config_error(code: int, stdout: str, stderr: str, *expected: str) -> None:
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("foundry: config error: "), stderr
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


# Through `python -m ssl_foundry.launch` in a child process: what a user sees, exit code included.
CLI_CASES = {
    "unknown-key": (["train.max_stepz=3"],
                    ["'train.max_stepz'", "Did you mean 'max_steps'?", "Valid keys under train: ",
                     *TRAIN_KEYS]),
    "wrong-type": (["train.max_steps=three"], ["train.max_steps", "expected int", "'three'"]),
    "missing-data-path": (["data.train={tmp}/no-shards-here"],
                          ["data.train", "'{tmp}/no-shards-here'", "manifest.json", "foundry prep"]),
    "override-without-value": (["train.max_steps"], ["'train.max_steps' is not key=value", "train.max_steps=100"]),
    "override-bad-yaml": (["data.mean=[0.5,"], ["'data.mean=[0.5,'", "not valid YAML"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_config_errors_through_the_cli(case, tmp_path):
    overrides, expected = CLI_CASES[case]
    out = tmp_path / "run"
    args = ["pretrain", str(RECIPE), f"output_dir={out}", *[o.format(tmp=tmp_path) for o in overrides]]
    done = run_cli(args, tmp_path, cwd=tmp_path)
    assert_config_error(done.returncode, done.stdout, done.stderr, *[e.format(tmp=tmp_path) for e in expected])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]  # nothing written (no mlflow.db either)


# The same `main` in this process (fast), for the other kinds of mistake: override -> expected.
MORE_CASES = {
    "trian.lr=1": ["'trian'", "Did you mean 'train'?", "Valid keys: output_dir, data, model, train"],
    "model.method_args.tempreature=0.1": ["'model.method_args.tempreature'", "Did you mean 'temperature'?",
                                          "proj_hidden_dim, proj_out_dim"],
    "model.backbone=resnet_18": ["model.backbone", "'resnet_18' is not a timm model", "resnet18"],
    "train.lr=fast": ["train.lr", "expected float", "'fast'"],
    "train.channels_last=maybe": ["train.channels_last", "expected true/false"],
    "data.mean=0.5": ["data.mean", "expected a list"],
    "train=5": ["train", "expected a mapping for TrainConfig"],
    "train.max_steps=2.5": ["train.max_steps", "expected an integer, got 2.5"],
    "train.optimizer=adam": ["train.optimizer", "'adam' is not one of lars, adamw, sgd"],
    "train.adam_betas=[0.9,1.5]": ["train.adam_betas", "two numbers in [0, 1)"],
    "=3": ["override '=3'", "not a dotted key"],
    "train..lr=0.1": ["override 'train..lr=0.1'", "not a dotted key"],
}


@pytest.mark.parametrize("override", list(MORE_CASES))
def test_more_config_errors(override, tmp_path, capsys, fmnist):
    data = [f"data.{k}={fmnist}/{split}" for k, split in
            (("train", "train"), ("eval_train", "train"), ("eval_test", "test"))]
    code = main(["pretrain", str(RECIPE), f"output_dir={tmp_path / 'run'}", *data, override])
    captured = capsys.readouterr()
    assert_config_error(code, captured.out, captured.err, *MORE_CASES[override])
    assert not (tmp_path / "run").exists()


def test_mistakes_in_the_recipe_file_name_the_key(tmp_path, capsys):
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["train"]["warmup_step"] = 10
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["pretrain", str(path)])
    captured = capsys.readouterr()
    assert_config_error(code, captured.out, captured.err, "'train.warmup_step'", "Did you mean 'warmup_steps'?")

    code = main(["pretrain", str(tmp_path / "no-such.yaml")])
    captured = capsys.readouterr()
    assert_config_error(code, captured.out, captured.err, "no-such.yaml", "not found", "configs/")


def test_overrides_may_follow_options(tmp_path, capsys, fmnist):
    """`foundry eval knn CFG --backbone X key=value`: the overrides after the option still apply."""
    code = main(["eval", "knn", str(RECIPE), "--backbone", str(tmp_path), f"data.train={fmnist / 'train'}",
                 f"data.eval_train={fmnist / 'train'}", f"data.eval_test={tmp_path / 'nowhere'}"])
    assert code == 2 and f"data.eval_test: no shards at '{tmp_path / 'nowhere'}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "knn", str(RECIPE), "--backbone", str(tmp_path), "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_global_batchnorm_is_refused_for_moco_v2_shuffling_bn():
    with pytest.raises(ConfigError, match="shuffling BN"):
        load_config(REPO / "configs" / "moco_v2_resnet18_fmnist.yaml", ["train.global_batchnorm=true"],
                    check_paths=False)
