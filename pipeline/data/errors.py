"""What the training loaders raise about their data (both backends)."""


class BadSampleError(ValueError):
    """A sample that does not decode, or has a member over data.max_sample_bytes; the message names
    its shard and key."""


class LoaderStalledError(RuntimeError):
    """No batch within data.timeout_s."""
