"""`foundry bench`: benchmarks that write JSON (numbers, never pass/fail), one module each (train,
prep, loader, strategies, scaling, quality, video, temporal_order); ``cli`` registers them. ``report`` holds
what every report records (the machine, peak memory) and writes it; ``runs`` starts the
pretraining runs that the run-based benchmarks compare."""
