"""`foundry bench`: benchmarks that write JSON (numbers, never pass/fail), one module each (train,
prep, loader, strategies, scaling, quality, video, temporal_order); launch/cli.py declares their
arguments. ``report`` holds what every report records (the machine, peak memory) and writes it;
``runs`` starts the pretraining runs that the run-based benchmarks compare."""

# The cases `foundry bench strategies` compares (its --cases): name -> the overrides that make it.
STRATEGY_CASES = {
    "ddp": ["train.strategy=ddp"],
    "zero1": ["train.strategy=deepspeed", "deepspeed.zero_stage=1"],
    "zero2": ["train.strategy=deepspeed", "deepspeed.zero_stage=2"],
    "zero3": ["train.strategy=deepspeed", "deepspeed.zero_stage=3"],
    "zero2-offload": ["train.strategy=deepspeed", "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu"],
    "zero3-offload": ["train.strategy=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu",
                      "deepspeed.offload_params=cpu"],
}
