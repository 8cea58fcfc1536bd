"""Starting a run (issue 20): recipes composed from base recipes through OmegaConf resolve to the
flat recipes they replaced; `foundry pretrain --print-config / --dry-run` show the resolved config
and what would run without training; a changed config never continues another run's output_dir."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ssl_foundry.pipeline.config import Config, ConfigError, build, load_config, to_dict, validate

FLAT = json.loads((REPO / "tests" / "fixtures" / "flat_recipes.json").read_text())  # scripts/snapshot_recipes.py


def test_every_recipe_of_the_snapshot_is_still_shipped():
    assert sorted(FLAT["recipes"]) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(FLAT["recipes"]))
def test_composed_recipe_equals_its_flat_twin(name):
    """Each recipe, built on configs/base/, resolves to exactly the Config its flat YAML (before
    composition, at the snapshot's revision) built."""
    flat = build(Config, FLAT["recipes"][name])
    validate(flat, check_paths=False)
    assert to_dict(load_config(REPO / "configs" / f"{name}.yaml", check_paths=False)) == to_dict(flat)


def write(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_merge_in_order_and_interpolations_see_overrides(tmp_path):
    write(tmp_path / "base" / "data.yaml", {"data": {"train": "shards/a", "eval_train": "${data.train}",
                                                      "num_workers": 3, "mean": [0.1, 0.1, 0.1]}})
    write(tmp_path / "base" / "schedule.yaml", {"defaults": ["data.yaml"], "data": {"num_workers": 5},
                                                 "train": {"max_steps": 7, "warmup_steps": 2}})
    recipe = write(tmp_path / "recipe.yaml", {
        "defaults": ["base/schedule.yaml"], "data": {"mean": [0.2, 0.2, 0.2], "views": [{"count": 2, "ops": []}]},
        "train": {"warmup_steps": 3}, "output_dir": "runs/${model.method}-${train.max_steps}"})
    cfg = load_config(recipe, check_paths=False)
    assert (cfg.data.train, cfg.data.eval_train, cfg.data.num_workers) == ("shards/a", "shards/a", 5)
    assert cfg.data.mean == [0.2, 0.2, 0.2] and cfg.data.std == [0.5, 0.5, 0.5]  # lists replaced; defaults kept
    assert (cfg.train.max_steps, cfg.train.warmup_steps, cfg.output_dir) == (7, 3, "runs/simclr-7")
    cfg = load_config(recipe, ["data.train=shards/b", "train.max_steps=9"], check_paths=False)
    assert (cfg.data.eval_train, cfg.output_dir) == ("shards/b", "runs/simclr-9")


@pytest.mark.parametrize("tree, expected", [
    ({"defaults": ["missing.yaml"]}, ["missing.yaml", "not found", "defaults"]),
    ({"defaults": "recipe.yaml"}, ["defaults include itself", "recipe.yaml -> "]),
    ({"defaults": [{"a": 1}]}, ["defaults must be a list of base recipe paths"]),
    ({"output_dir": "${train.no_such_key}"}, ["no_such_key", "output_dir"]),
])
def test_composition_mistakes_name_the_file_and_the_fix(tmp_path, tree, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path / "recipe.yaml", tree), check_paths=False)
    for text in expected:
        assert text in str(err.value), str(err.value)


# ----------------------------------------------------------------------------- --print-config, --dry-run


def test_print_config_is_the_resolved_config_as_yaml(tmp_path, capsys):
    from ssl_foundry.launch.cli import main

    recipe = REPO / "configs" / "simclr_resnet18_fmnist.yaml"
    overrides = [f"output_dir={tmp_path / 'run'}", "data.train=elsewhere/train", "train.lr=0.6"]
    assert main(["pretrain", str(recipe), "--print-config", *overrides]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(recipe, overrides, check_paths=False))
    assert (printed["train"]["lr"], printed["data"]["eval_train"]) == (0.6, "elsewhere/train")  # base's ${data.train}
    assert printed["train"]["checkpoint_every"] == 200 and printed["eval"]["knn_k"] == 200  # base; dataclass default
    assert not (tmp_path / "run").exists()


def test_dry_run_says_what_would_run_and_runs_nothing(fmnist, tmp_path, capsys):
    from conftest import write_recipe
    from ssl_foundry.launch.cli import main

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "run.yaml", fmnist, out)
    code = main(["pretrain", str(recipe), "--dry-run", "launch.nproc_per_node=2", "train.grad_accum_steps=2",
                 "train.batch_size=16", "data.backend=auto", "train.precision=bf16"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = dict(line.split(":", 1) for line in printed.splitlines() if ":" in line)
    assert lines["output_dir"].strip() == f"{out}: a new run from step 0"
    assert lines["ranks"].strip().startswith("2 (launch.nproc_per_node=2 x launch.nnodes=1) on cpu, process group gloo")
    assert lines["batch"].strip() == "16 global = 2 rank(s) x 4 per rank x 2 accumulation step(s)"
    assert lines["lr"].strip().startswith("0.01875 = train.lr 0.3 x batch 16 / train.lr_batch_ref 256 (lars")
    assert lines["steps"].strip() == "4 (warmup 2, cosine to min_lr 0); an epoch is 8.0 steps"  # 128 images / 16
    assert lines["data"].strip() == f"{fmnist / 'train'}: 128 samples in 8 shards"
    assert lines["loader"].strip().startswith("batched (auto: on cpu), 0 worker(s) per rank, 2 view(s)")
    assert lines["precision"].strip() == "bf16 autocast (train.precision=bf16)"
    assert printed.rstrip().endswith("nothing was run (--dry-run)")
    assert not out.exists()


@pytest.mark.parametrize("overrides, expected", [
    (["train.batch_size=9", "launch.nproc_per_node=2"], ["train.batch_size=9", "does not split over 2 rank(s)"]),
    (["data.train={tmp}/none"], ["data.train", "manifest.json"]),
])
def test_dry_run_config_errors_exit_2_with_one_line(fmnist, tmp_path, capsys, overrides, expected):
    from conftest import write_recipe
    from ssl_foundry.launch.cli import main

    recipe = write_recipe(tmp_path / "run.yaml", fmnist, tmp_path / "run")
    assert main(["pretrain", str(recipe), "--dry-run", *[o.format(tmp=tmp_path) for o in overrides]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(text in err[0] for text in expected), err


def test_version(capsys):
    from importlib.metadata import version

    from ssl_foundry.launch.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"foundry {version('ssl-foundry')}"


# ----------------------------------------------------------------------------- an output_dir holds one run


def test_a_changed_config_never_continues_the_run_in_output_dir(tiny_config, tmp_path, capfd):
    """A real 2-step run; then: a changed lr is refused (exit 2, one line naming the key and both
    ways forward) and leaves the run untouched; the same config with a longer schedule continues it;
    train.resume=never starts anew."""
    from ssl_foundry.launch.cli import main
    from ssl_foundry.pipeline.train.checkpoint import list_checkpoints
    from ssl_foundry.pipeline.train.trainer import train

    out = tmp_path / "run"
    first = train(tiny_config(out, "train.max_steps=2"))
    recipe, started = str(tmp_path / "run.yaml"), (out / "config.yaml").read_text()

    assert main(["pretrain", recipe, "train.lr=0.6", "model.method_args.temperature=0.1"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for text in (f"output_dir {out} holds a run started with another config",
                 "model.method_args.temperature: 0.2 -> 0.1", "train.lr: 0.3 -> 0.6", "train.resume=never",
                 "output_dir=", str(out / "config.yaml")):
        assert text in err[0], err[0]
    assert (out / "config.yaml").read_text() == started and json.loads((out / "result.json").read_text())["steps"] == 2
    with pytest.raises(ConfigError, match="train.lr: 0.3 -> 0.6"):  # the trainer itself, whatever launched it
        train(tiny_config(out, "train.lr=0.6"))

    assert main(["pretrain", recipe, "--dry-run", "train.max_steps=3", "train.log_every=2"]) == 0
    assert f"output_dir:  {out}: continues the run there from step 2" in capfd.readouterr().out
    longer = train(tiny_config(out, "train.max_steps=3", "train.log_every=2", "eval.knn_k=5"))
    assert (longer.steps, longer.run_id) == (3, first.run_id)

    assert main(["pretrain", recipe, "--dry-run", "train.lr=0.6", "train.resume=never"]) == 0
    assert f"output_dir:  {out}: a new run from step 0" in capfd.readouterr().out
    fresh = train(tiny_config(out, "train.lr=0.6", "train.resume=never", "train.max_steps=1"))
    assert fresh.steps == 1 and fresh.run_id != first.run_id
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000001.pt"]  # not the old run's
    (aside,) = (out / "replaced").iterdir()  # the old run, kept
    assert [p.name for p in list_checkpoints(aside / "checkpoints")] == ["step-00000002.pt", "step-00000003.pt"]
    assert json.loads((aside / "result.json").read_text())["steps"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.6
