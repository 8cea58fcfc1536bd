"""Config mistakes through the real CLI: a one-line message on stderr that names the key (and the
valid keys, the close match, the expected type, the missing path and the `foundry prep` command),
exit code 2, no traceback, and nothing started or written."""
import argparse
import pkgutil
import re
import subprocess
import sys

import pytest
import yaml

from conftest import RECIPE, REPO, run_cli, subprocess_env
from ssl_foundry.launch.cli import build_parser, main
from ssl_foundry.pipeline.config import ConfigError, load_config, split_batch

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
    "train.grad_accum_steps=3": ["train.batch_size=256 does not split over 1 rank(s) x "
                                 "train.grad_accum_steps=3: make it a multiple of 3"],
    "data.readers=3": ["data.readers=3 does not divide the 256 samples of a forward pass"],
    "data.views=[{count: 2, ops: [{op: resize, args: {size: -4}}]}]": [
        "data.views[0].ops[0]: augmentation op 'resize': bad args {'size': -4} (size must be positive"],
    "data.views=[{count: 0, ops: []}]": ["data.views[0]: count=0: a view makes at least 1 output"],
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
    path = tmp_path / "recipe.yaml"  # the shipped recipe, as a base, with a misspelt key
    path.write_text(yaml.safe_dump({"defaults": [str(RECIPE)], "train": {"warmup_step": 10}}))
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


def test_help_and_argument_errors_answer_without_torch(tmp_path):
    """`foundry --help` and a mistyped argument import no command's module (torch, MLflow: seconds)."""
    code = ("import sys\nfrom ssl_foundry.launch.cli import main\n"
            "for argv in (['--help'], ['bench', 'strategies', 'c.yaml', '--cases', 'zero4'],\n"
            "             ['prep', 'video', 'src', 'out', '--codec', 'av1']):\n"
            "    try:\n        main(argv)\n    except SystemExit as done:\n        print('exit', done.code)\n"
            "print('imported:', *sorted(m for m in ('torch', 'timm', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(tmp_path),
                          capture_output=True, text=True)
    assert done.stdout.splitlines()[-4:] == ["exit 0", "exit 2", "exit 2", "imported:"], done.stdout + done.stderr
    assert "pretrain" in done.stdout
    assert "invalid choice: 'zero4'" in done.stderr and "invalid choice: 'av1'" in done.stderr


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(the words of every command, the "module:function" that runs it)."""
    if parser.get_default("run"):
        yield words, parser.get_default("run")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*words, name))


def test_every_command_runs_a_function_that_exists():
    commands = dict(_commands(build_parser()))
    assert {("pretrain",), ("prep", "video"), ("eval", "finetune"), ("bench", "strategies"),
            ("check", "gpu")} <= set(commands)
    for words, run in commands.items():
        assert callable(pkgutil.resolve_name(run)), (words, run)


def test_global_batchnorm_is_refused_for_moco_v2_shuffling_bn():
    with pytest.raises(ConfigError, match="shuffling BN"):
        load_config(REPO / "configs" / "moco_v2_resnet18_fmnist.yaml", ["train.global_batchnorm=true"],
                    check_paths=False)


# ----------------------------------------------------------------------------- every numeric key

# Keys where 0 is a valid value (it means "off", "auto" or is simply in range); anywhere else 0 is
# refused. A negative number, a word and NaN are refused for every numeric key.
ZERO_IS_VALID = {
    "data.num_workers", "data.retries", "data.shuffle_buffer", "data.readers", "data.clip_frames", "data.mean", "data.views.ops.p",
    "train.budget_minutes", "train.min_lr", "train.weight_decay", "train.weight_decay_end", "train.momentum",
    "train.adam_betas", "train.warmup_steps", "train.grad_clip", "train.ema_decay", "train.seed", "train.keep_checkpoints", "train.threads",
    "eval.knn_every", "eval.embedding_map_points", "eval.linear.momentum", "eval.linear.weight_decay",
    "eval.linear.seed", "eval.finetune.weight_decay", "eval.finetune.warmup_steps", "eval.finetune.label_smoothing",
    "eval.finetune.mixup_alpha", "eval.finetune.cutmix_alpha", "eval.gate.threshold", "mlflow.outage_minutes",
    "launch.gpus_per_node", "launch.tasks_per_node", "launch.cpus_per_task", "launch.signal_delay_s",
    "launch.max_requeues", "launch.min_nodes", "launch.max_restarts",
}
# Keys where -1 is valid too (a default resolved later): -2 is tried instead.
MINUS_ONE_IS_VALID = {"launch.max_restarts"}
# Keys that only mean something beside others: the context a value is tried in.
CONTEXT = {"deepspeed.zero_stage": ["train.strategy=deepspeed", "train.optimizer=adamw"]}


def numeric_keys(cls=None, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted key, int or float) of every number, optional number and list of numbers in the config
    dataclasses; the views' keys as data.views.count and data.views.ops.p."""
    import dataclasses
    import types
    import typing

    from ssl_foundry.pipeline.config import Config
    from ssl_foundry.pipeline.data.augment.spec import AugmentOp, ViewSpec

    keys = []
    for name, tp in typing.get_type_hints(cls or Config).items():
        key = f"{prefix}{name}"
        item = typing.get_args(tp)[0] if typing.get_origin(tp) in (list, types.UnionType) else tp  # X | None: X
        if dataclasses.is_dataclass(item):
            keys += numeric_keys(item, f"{key}.")
        elif item in (int, float):
            keys.append((key, item))
    assert cls is not None or {"data.views.count", "data.views.ops.p"} <= {k for k, _ in keys}, (ViewSpec, AugmentOp)
    return keys


def override(key: str, value: str) -> tuple[str, str]:
    """The override that sets ``key`` to ``value`` (every element of a list), and the key the error names."""
    import typing

    from ssl_foundry.pipeline.config import Config

    if key == "data.views.count":
        return f"data.views=[{{count: {value}, ops: [{{op: horizontal_flip}}]}}]", "data.views[0]"
    if key == "data.views.ops.p":
        return f"data.views=[{{count: 2, ops: [{{op: horizontal_flip, p: {value}}}]}}]", "data.views[0].ops[0]"
    node = Config
    for part in key.split("."):
        tp = typing.get_type_hints(node)[part]
        node = tp
    length = 2 if key in ("train.adam_betas", "eval.finetune.crop_scale") else 3
    return (f"{key}=[{', '.join([value] * length)}]" if typing.get_origin(node) is list else f"{key}={value}"), key


@pytest.mark.parametrize("key,kind", numeric_keys(), ids=[k for k, _ in numeric_keys()])
def test_every_numeric_key_refuses_values_out_of_its_range(key, kind, tmp_path, capsys, fmnist):
    """0 (where it is not a valid value), -1, a word and NaN (floats): exit 2 and one line naming the
    key and the value, through the CLI's own entry point, before anything is written."""
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "run")
    bad = ["-2" if key in MINUS_ONE_IS_VALID else "-1", "ten"] + (["nan"] if kind is float else []) + (
        [] if key in ZERO_IS_VALID else ["0"])
    for value in bad:
        setting, named = override(key, value)
        code = main(["pretrain", str(recipe), *CONTEXT.get(key, []), setting])
        captured = capsys.readouterr()
        assert_config_error(code, captured.out, captured.err, named, value)
    if key in ZERO_IS_VALID:
        load_config(recipe, [*CONTEXT.get(key, []), override(key, "0")[0]])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,expected", [
    # 2 nodes x 4 GPUs = 8 ranks, whatever launch.nproc_per_node says (torchrun's key)
    (["launch.nodes=2", "launch.gpus_per_node=4", "train.batch_size=12"],
     "train.batch_size=12 does not split over 8 rank(s): make it a multiple of 8 (e.g. 8 or 16)"),
    # CPU tasks: the torch loader, so each rank's 4 samples must split over its 3 loader workers
    (["launch.nodes=1", "launch.tasks_per_node=2", "train.batch_size=8", "data.num_workers=3"],
     "train.batch_size=8 gives each rank 4 samples per forward pass, which do not split over data.num_workers=3"),
    # GPUs with data.backend=auto: the job's node picks the loader, so only the split over ranks is checked
    (["launch.nodes=1", "launch.gpus_per_node=2", "train.batch_size=8", "data.num_workers=3"], None),
], ids=["gpus-over-nodes", "cpu-tasks-and-workers", "gpu-job-auto-backend"])
def test_foundry_submit_splits_the_batch_over_the_ranks_it_asks_slurm_for(fmnist, tmp_path, overrides, expected):
    from conftest import write_recipe
    from ssl_foundry.pipeline.data.loader import validate_batch

    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "run")
    cfg = load_config(recipe, overrides)
    if expected is None:
        validate_batch(cfg, launcher="slurm")
    else:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            validate_batch(cfg, launcher="slurm")


@pytest.mark.parametrize("args, local", [
    ((256, 4, 2), 32),  # batch, ranks, accumulation
    ((256, 4, 2, 0, 2), 32),  # + the torch loader's readers (one per rank x worker: 8), 2 workers
    ((256, 2, 1, 8, 2), 128),  # 8 fixed readers over 2 ranks x 2 workers
    ((24, 2, 1, None, 4), 12),  # DALI (readers None): its threads do not split the batch
])
def test_split_batch_gives_each_rank_its_share(args, local):
    assert split_batch(*args) == local


@pytest.mark.parametrize("args, message", [
    ((30, 4, 1), "train.batch_size=30 does not split over 4 rank(s): make it a multiple of 4"),
    ((32, 4, 3), "train.batch_size=32 does not split over 4 rank(s) x train.grad_accum_steps=3: make it a "
                 "multiple of 12"),
    ((20, 2, 1, 0, 4), "gives each rank 10 samples per forward pass, which do not split over data.num_workers=4 loader workers"),
    ((40, 2, 1, 16), "data.readers=16 does not divide the 40 samples of a forward pass"),
    ((63, 3, 1, 4), "data.readers=4 is not a multiple of 3 rank(s) x 1 loader worker(s)"),
])
def test_split_batch_names_the_keys_and_the_multiple(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        split_batch(*args)


def test_the_view_spec_is_parsed_once_into_typed_ops_and_saved_as_written(tmp_path):
    from ssl_foundry.pipeline.config import config_from_dict, save_config, to_dict
    from ssl_foundry.pipeline.data.augment.spec import ColorJitter, HorizontalFlip, RandomResizedCrop

    cfg = load_config(RECIPE, check_paths=False)
    crop, flip, jitter = cfg.data.views[0].ops
    assert crop.params == RandomResizedCrop(size=(32, 32), scale=(0.2, 1.0)) and crop.p == 1.0
    assert flip.params == HorizontalFlip() and flip.p == 0.5
    assert jitter.params == ColorJitter(brightness=0.4, contrast=0.4)
    saved = to_dict(cfg)["data"]["views"]
    assert saved == [{"count": 2, "ops": [
        {"op": "random_resized_crop", "p": 1.0, "args": {"size": 32, "scale": [0.2, 1.0]}},
        {"op": "horizontal_flip", "p": 0.5, "args": {}},
        {"op": "color_jitter", "p": 0.8, "args": {"brightness": 0.4, "contrast": 0.4}}]}]
    save_config(cfg, tmp_path / "config.yaml")  # plain YAML (the typed params are not saved)
    again = load_config(tmp_path / "config.yaml", check_paths=False)
    assert again.data.views == cfg.data.views == config_from_dict(to_dict(cfg)).data.views
    assert again.data.views[0].ops[0].params == crop.params
