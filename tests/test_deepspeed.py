"""``train.strategy=deepspeed``: DeepSpeed ZeRO-1/2/3 on DeepSpeed's CPU accelerator with gloo, 2 real
ranks under torchrun, against the DDP strategy on the same seeds and data.

- Every method in the registry at every stage (tests/strategy_equivalence_worker.py, one torchrun
  for all cases): per-step losses and gradient norms, and every tensor of the final state
  (momentum targets, MAE's decoder, BN statistics, ZeRO-3 shards gathered) equal DDP's within
  fp32 reduction-order noise; ZeRO-Offload (CPU Adam; stage-3 parameter offload), activation
  checkpointing and global BatchNorm under ZeRO-3 too; bf16 autocast close to DDP's bf16.
- Through `foundry pretrain`: a ZeRO-3 run with a momentum target, copied as if it had crashed after
  its step-2 checkpoint, resumes to bitwise the same exported backbone, in the same MLflow run; the
  backbone (consolidated from the shards) equals the DDP run's and loads in plain timm.
- Checkpoint directories are atomic; a bad DeepSpeed config fails before training, naming the key.
"""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli, subprocess_env, write_recipe
from strategy_equivalence_worker import METHOD_ARGS
from mlflow import MlflowClient
from safetensors.torch import load_file

from ssl_foundry.pipeline.config import ConfigError
from ssl_foundry.pipeline.train.checkpoint import (checkpoint_dir, commit_checkpoint_dir, latest_checkpoint,
                                                   list_checkpoints)

STAGES = (1, 2, 3)
EQUIVALENCE_METHODS = list(METHOD_ARGS)  # joint-embedding methods, MAE, S4L (the labels path), video methods
VARIANT_CASES = {  # name: (the DDP reference, the DeepSpeed case)
    "zero2-offload-optimizer": ("simclr:ddp", "simclr:deepspeed:deepspeed.zero_stage=2,deepspeed.offload_optimizer=cpu"),
    "zero3-offload-all": ("moco_v3:ddp", "moco_v3:deepspeed:deepspeed.zero_stage=3,deepspeed.offload_optimizer=cpu,"
                                         "deepspeed.offload_params=cpu"),
    "zero3-activation-checkpointing": ("mae:ddp",
                                       "mae:deepspeed:deepspeed.zero_stage=3,train.activation_checkpointing=true"),
    "zero3-global-batchnorm": ("byol:ddp:train.global_batchnorm=true",
                               "byol:deepspeed:deepspeed.zero_stage=3,train.global_batchnorm=true"),
}
BF16_DDP, BF16_ZERO2 = "simclr:ddp:train.precision=bf16", "simclr:deepspeed:deepspeed.zero_stage=2,train.precision=bf16"


def zero_case(method: str, stage: int) -> str:
    return f"{method}:deepspeed:deepspeed.zero_stage={stage}"


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """All cases on 2 ranks in one torchrun (engines are built one after another)."""
    tmp = tmp_path_factory.mktemp("equivalence")
    cases = [f"{m}:ddp" for m in EQUIVALENCE_METHODS] + [zero_case(m, s) for m in EQUIVALENCE_METHODS
                                                           for s in STAGES]
    cases += [case for pair in VARIANT_CASES.values() for case in pair if case not in cases] + [BF16_DDP, BF16_ZERO2]
    out = tmp / "results.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(REPO / "tests" / "strategy_equivalence_worker.py"), str(out), *cases],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=subprocess_env(tmp, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out)


def assert_same_training(ddp: dict, other: dict, loss_rtol: float, state_rtol: float, state_atol: float) -> None:
    """Tolerances (fp32). The strategies differ only in reduction order, so step 1 agrees to a few
    ulps (~1e-7); later steps see that rounding amplified by the training dynamics. Micro-batches
    have 4 samples per rank: with 2, a BatchNorm head (MoCo v3, Barlow Twins, BYOL) maps any pair to
    +-1 and its gradient scales as 1 / |x1 - x2|, which amplified rounding to 0.8 % in the grad norm
    on an AVX512 CPU (other kernels, other rounding than AVX2). At 4 the measured worst cases are
    loss 7e-7 and grad norm 3e-5 (AVX512-BF16), leaving these bounds 70x and 170x of margin."""
    assert other["losses"][0] == pytest.approx(ddp["losses"][0], rel=1e-6)  # same weights, same forward
    torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(ddp["losses"]), rtol=loss_rtol, atol=0)
    torch.testing.assert_close(torch.tensor(other["grad_norms"]), torch.tensor(ddp["grad_norms"]),
                               rtol=100 * loss_rtol, atol=0)
    assert other["state"].keys() == ddp["state"].keys()
    for name, value in ddp["state"].items():
        torch.testing.assert_close(other["state"][name], value, rtol=state_rtol, atol=state_atol, msg=name)


def assert_trained(run: dict) -> None:
    """The comparison is between models that moved: the backbone, and a momentum target if any."""
    moved = {name for name, value in run["state"].items() if not torch.equal(value, run["initial"][name])}
    assert any(name.startswith("backbone.") for name in moved)
    targets = [name for name in run["state"] if name.startswith("target.")]
    if targets:
        assert any(name in moved for name in targets), "the momentum target was never updated"


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("method", EQUIVALENCE_METHODS)
def test_zero_stage_trains_like_ddp(equivalence, method, stage):
    """fp32, 3 steps of 2 accumulated micro-batches, AdamW + warmup + clipping: DeepSpeed's
    reduce(-scatter) sums in another order than DDP's all-reduce, nothing else differs."""
    ddp, zero = equivalence[f"{method}:ddp"], equivalence[zero_case(method, stage)]
    assert_trained(ddp)
    assert_same_training(ddp, zero, loss_rtol=5e-5, state_rtol=1e-3, state_atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", VARIANT_CASES, ids=list(VARIANT_CASES))
def test_offload_checkpointing_global_bn_train_like_ddp(equivalence, case):
    """DeepSpeed's CPU Adam (AdamW mode) on the offloaded fp32 master weights == torch AdamW; blocks
    recomputed in backward (train.activation_checkpointing) under ZeRO-3 == stored activations; global
    BatchNorm's all-reduces inside ZeRO-3's gathered forward == under DDP."""
    reference, variant = VARIANT_CASES[case]
    assert_same_training(equivalence[reference], equivalence[variant],
                         loss_rtol=5e-5, state_rtol=1e-3, state_atol=1e-4)


@pytest.mark.slow
def test_bf16_autocast_is_close_to_ddp_bf16(equivalence):
    """Both run bf16 autocast over fp32 master weights; DeepSpeed also all-reduces the linear layers'
    gradients in bf16 (its torch_autocast comm dtype), hence the looser tolerance."""
    ddp, zero = equivalence[BF16_DDP], equivalence[BF16_ZERO2]
    assert_same_training(ddp, zero, loss_rtol=1e-2, state_rtol=5e-2, state_atol=5e-3)
    fp32 = equivalence["simclr:ddp"]
    assert ddp["losses"] != fp32["losses"]  # autocast did run


# ----------------------------------------------------------------------------- through `foundry pretrain`

ZERO3_MOCO = ["model.method=moco_v3", "model.method_args={proj_hidden_dim: 32, proj_out_dim: 16, "
              "pred_hidden_dim: 32, momentum: 0.9}", "train.optimizer=adamw", "train.lr=0.001",
              "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3", "data.num_workers=1",
              "launch.nproc_per_node=2"]


def backbone_state(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "backbone" / "model.safetensors")


@pytest.fixture(scope="module")
def zero3_run(fmnist, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    recipe = write_recipe(tmp / "recipe.yaml", fmnist, tmp / "straight")
    proc = run_cli(["pretrain", str(recipe), "train.strategy=deepspeed", "deepspeed.zero_stage=3", *ZERO3_MOCO], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp, recipe


@pytest.mark.slow
def test_zero3_checkpoint_resume_is_exact(zero3_run):
    tmp, recipe = zero3_run
    straight = tmp / "straight"
    result = json.loads((straight / "result.json").read_text())
    assert result["steps"] == 4 and len(result["memory_mb"]["peak_rss"]) == 2
    assert [p.name for p in list_checkpoints(straight / "checkpoints")] == ["step-00000002", "step-00000004"]
    assert len(list((straight / "checkpoints" / "step-00000002").glob("*optim_states.pt"))) == 2  # a shard per rank
    used = json.loads((straight / "deepspeed_config.json").read_text())  # also an MLflow artifact
    assert used["zero_optimization"]["stage"] == 3 and used["train_micro_batch_size_per_gpu"] == 4

    # The run as a crash right after its step-2 checkpoint leaves it: later files never written.
    crashed = tmp / "crashed"
    shutil.copytree(straight, crashed)
    for later in ("checkpoints/step-00000004", "backbone", "result.json"):
        path = crashed / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    proc = run_cli(["pretrain", str(recipe), f"output_dir={crashed}", "train.strategy=deepspeed",
                    "deepspeed.zero_stage=3", *ZERO3_MOCO, f"mlflow.tracking_uri={result['tracking_uri']}"], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"resumed at step 2 from {crashed / 'checkpoints' / 'step-00000002'}" in proc.stderr
    resumed = json.loads((crashed / "result.json").read_text())
    assert resumed["steps"] == 4 and resumed["final_loss"] == result["final_loss"]
    assert resumed["run_id"] == result["run_id"]  # the same MLflow run, continued
    client = MlflowClient(tracking_uri=resumed["tracking_uri"])
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"

    a, b = backbone_state(straight), backbone_state(crashed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_zero3_backbone_is_the_ddp_backbone_and_loads_in_timm(zero3_run):
    """The backbone consolidated from ZeRO-3 shards (zero_to_fp32) == the DDP run's on the same data."""
    tmp, recipe = zero3_run
    proc = run_cli(["pretrain", str(recipe), f"output_dir={tmp / 'ddp'}", "train.strategy=ddp", *ZERO3_MOCO], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    zero3, ddp = backbone_state(tmp / "straight"), backbone_state(tmp / "ddp")
    assert zero3.keys() == ddp.keys()
    for name in ddp:
        torch.testing.assert_close(zero3[name], ddp[name], rtol=1e-3, atol=1e-4, msg=name)

    # Plain timm in a fresh interpreter, no project code on the path.
    script = ("import sys, timm, torch\n"
              "m = timm.create_model('local-dir:' + sys.argv[1], pretrained=True).eval()\n"
              "print(tuple(m(torch.zeros(2, 3, 16, 16)).shape))\n")
    out = subprocess.run([sys.executable, "-I", "-c", script, str(tmp / "straight" / "backbone")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 192)"


@pytest.mark.slow
def test_resume_refuses_another_world_size_or_strategy(zero3_run):
    tmp, recipe = zero3_run
    one_rank = run_cli(["pretrain", str(recipe), f"output_dir={tmp / 'straight'}", "train.strategy=deepspeed",
                        "deepspeed.zero_stage=3", *ZERO3_MOCO[:-1], "train.max_steps=6"], tmp)
    assert one_rank.returncode != 0
    assert "holds the ZeRO shards of 2 ranks, this run has 1" in one_rank.stderr
    assert "universal checkpoint (python -m deepspeed.checkpoint.ds_to_universal)" in one_rank.stderr
    ddp = run_cli(["pretrain", str(recipe), f"output_dir={tmp / 'straight'}", "train.strategy=ddp",
                   *ZERO3_MOCO, "train.max_steps=6"], tmp)
    assert ddp.returncode != 0
    # Another strategy is another config: refused before any checkpoint is opened, naming the key.
    assert "holds a run started with another config" in ddp.stderr and "train.strategy" in ddp.stderr


@pytest.mark.slow
def test_one_process_zero2_run(fmnist, tmp_path):
    """No launcher: DeepSpeed gets a one-rank process group; ZeRO-2 with gradient accumulation."""
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "run")
    proc = run_cli(["pretrain", str(recipe), "train.strategy=deepspeed", "deepspeed.zero_stage=2",
                    "train.optimizer=sgd", "train.lr=0.05", "train.grad_accum_steps=2", "train.max_steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 3 and len(result["memory_mb"]["rss"]) == 1
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- checkpoints and config


def test_checkpoint_directories_are_committed_atomically(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        tmp = folder / f".step-{step:08d}.tmp"
        tmp.mkdir(parents=True)
        (tmp / "shard.pt").write_bytes(b"x" * step)
        commit_checkpoint_dir(tmp, checkpoint_dir(folder, step), keep=2)
    # A crash mid-save leaves only a dot-named temp directory: never a resume candidate.
    (folder / ".step-00000008.tmp").mkdir()
    (folder / "step-00000001.pt").write_bytes(b"a DDP file")  # both layouts are listed, by step
    assert [p.name for p in list_checkpoints(folder)] == ["step-00000001.pt", "step-00000004", "step-00000006"]
    assert latest_checkpoint(folder) == checkpoint_dir(folder, 6)
    # Saving a step again replaces it whole.
    tmp = folder / ".step-00000006.tmp"
    tmp.mkdir()
    (tmp / "shard.pt").write_bytes(b"new")
    commit_checkpoint_dir(tmp, checkpoint_dir(folder, 6), keep=3)
    assert [p.name for p in checkpoint_dir(folder, 6).iterdir()] == ["shard.pt"]
    assert (checkpoint_dir(folder, 6) / "shard.pt").read_bytes() == b"new"
    assert not tmp.exists()


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def test_deepspeed_keys_without_the_deepspeed_strategy_are_an_error(tiny_config, tmp_path):
    """Otherwise `deepspeed.zero_stage=3` without `train.strategy=deepspeed` would silently train DDP."""
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path / "run", "deepspeed.zero_stage=3")
    assert "deepspeed.zero_stage set but train.strategy=ddp" in str(err.value)


@pytest.mark.parametrize("overrides,message", [
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: 4 is not a ZeRO stage"),
    (["deepspeed.zero_stage=0"], "plain data parallelism: use train.strategy=ddp"),
    (["deepspeed.zero_stage=2", "deepspeed.offload_params=cpu", "train.optimizer=adamw"],
     "parameter offload needs ZeRO stage 3"),
    (["deepspeed.offload_optimizer=cpu", "train.optimizer=sgd"], "set train.optimizer=adamw"),
    (["deepspeed.offload_optimizer=gpu", "train.optimizer=adamw"], "'gpu' is not one of none, cpu"),
    (["train.optimizer=lars"], "LARS' layer-wise trust ratio"),
    (["deepspeed.zero_stage=3", "train.optimizer=adamw", "eval.knn_every=10"], "ZeRO-3 has partitioned"),
], ids=["stage4", "stage0", "param-offload-stage2", "offload-sgd", "offload-device", "lars", "knn-monitor-zero3"])
def test_bad_deepspeed_keys_are_config_errors(tiny_config, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        tiny_config(tmp_path / "run", "train.strategy=deepspeed", *overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("user_json,message", [
    ({"zero_optimisation": {"stage": 3}}, "'zero_optimisation' (did you mean 'zero_optimization'?)"),
    ({"zero_optimization": {"overlap_com": True}}, "overlap_com"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage=4"),
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "parameter offload needs ZeRO stage 3"),
    ({"train_micro_batch_size_per_gpu": 4}, "use train.batch_size"),
    ({"optimizer": {"type": "Adam"}}, "use train.optimizer"),
    ({"bf16": {"enabled": True}}, "use train.precision"),
], ids=["typo-top-level", "typo-in-section", "stage4", "param-offload-stage2", "batch", "optimizer", "bf16"])
def test_bad_user_deepspeed_json_is_a_config_error(tiny_config, tmp_path, user_json, message):
    path = write_json(tmp_path / "ds.json", user_json)
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path / "run", "train.strategy=deepspeed", "train.optimizer=adamw",
                    f"deepspeed.config_json={path}")
    assert message in str(err.value)


def test_generated_deepspeed_config(tiny_config, tmp_path):
    from ssl_foundry.pipeline.config import deepspeed_config

    user = write_json(tmp_path / "ds.json", {"zero_optimization": {"overlap_comm": False,
                                                                   "stage3_prefetch_bucket_size": 1000},
                                             "wall_clock_breakdown": True})
    cfg = tiny_config(tmp_path / "run", "train.strategy=deepspeed", "deepspeed.zero_stage=3", "train.optimizer=adamw",
                      "deepspeed.offload_params=cpu", "train.batch_size=32", "train.grad_accum_steps=2",
                      "train.grad_clip=1.5", f"deepspeed.config_json={user}")
    ds = deepspeed_config(cfg.deepspeed, cfg.train, micro_batch=4, amp_dtype=torch.bfloat16, cuda=True)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.5
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                       "overlap_comm": False, "stage3_prefetch_bucket_size": 1000}
    assert ds["wall_clock_breakdown"] is True


@pytest.mark.slow
def test_bad_config_fails_before_any_rank_starts(fmnist, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "run")
    proc = run_cli(["pretrain", str(recipe), "train.strategy=deepspeed", "deepspeed.zero_stage=4",
                    "launch.nproc_per_node=2"], tmp_path)
    assert proc.returncode != 0
    assert "deepspeed.zero_stage: 4 is not a ZeRO stage; choose 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_shipped_deepspeed_json_is_valid(tiny_config, tmp_path):
    from ssl_foundry.pipeline.config import deepspeed_config

    shipped = REPO / "configs" / "deepspeed" / "small_buckets.json"
    cfg = tiny_config(tmp_path / "run", "train.strategy=deepspeed", "deepspeed.zero_stage=3", "train.optimizer=adamw",
                      f"deepspeed.config_json={shipped}")
    zero = deepspeed_config(cfg.deepspeed, cfg.train, micro_batch=4, amp_dtype=None, cuda=False)["zero_optimization"]
    assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 5_000_000
