"""launch: the `foundry` command, run configuration and process launchers."""
