"""Gradient accumulation: one optimizer step over ``grad_accum_steps`` micro-batches.

Global-batch losses (NT-Xent's negatives, BatchNorm statistics) make an accumulated step differ from
one large batch by design, so the reference is the definition itself: each micro-batch's loss
divided by the number of micro-batches, gradients summed, then one optimizer step.
"""
import torch

from ssl_foundry.pipeline.train.trainer import Trainer


def test_one_step_equals_summed_micro_batch_gradients(tiny_config, tmp_path):
    overrides = ["train.max_steps=1", "train.batch_size=8", "train.grad_accum_steps=2", "data.num_workers=0",
                 "train.warmup_steps=0", "train.resume=never"]
    trained = Trainer(tiny_config(tmp_path / "trained", *overrides))
    assert trained.local_batch == 4
    trained.train()

    reference = Trainer(tiny_config(tmp_path / "reference", *overrides))  # same seed: same weights
    batches = reference._loader()
    reference.scheduler.step_update(0)
    reference.model.train()
    for _ in range(2):
        loss = reference.model(reference._to_device(next(batches)["views"]))["loss"] / 2
        loss.backward()
    reference.optimizer.step()

    for (name, got), want in zip(trained.model.state_dict().items(), reference.model.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    # and the step really moved the weights
    fresh = Trainer(tiny_config(tmp_path / "fresh", *overrides)).model.state_dict()
    assert any(not torch.equal(fresh[n], p) for n, p in trained.model.state_dict().items())
