"""The optional parts of ssl-foundry: which pip extra (``[project.optional-dependencies]`` in
pyproject.toml) installs the module each needs, and the one message a missing one gives.

    pip install "ssl-foundry[video]"       PyAV: video prep, clip shards, the video methods
    pip install "ssl-foundry[dali]"        NVIDIA DALI: data.backend=dali, data.video_decoder=dali
    pip install "ssl-foundry[deepspeed]"   DeepSpeed: train.strategy=deepspeed

The config names a missing one before any process starts (``require``); a command that imports
one anyway has its ModuleNotFoundError turned into the same message by the CLI (``install_hint``).
"""
from __future__ import annotations

import importlib.util

from ssl_foundry.pipeline.config_error import ConfigError

# module -> the extra that installs it
EXTRAS = {"av": "video", "nvidia.dali": "dali", "deepspeed": "deepspeed"}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package (nvidia)
        return False


def install_hint(missing: str | None) -> str | None:
    """The pip command that installs the optional module ``missing`` (or a module inside it, or the
    parent package of one: ``nvidia``), or None for a module that is not optional."""
    for module, extra in EXTRAS.items():
        if missing and (missing == module or missing.startswith(module + ".") or module.startswith(missing + ".")):
            return f"pip install 'ssl-foundry[{extra}]'"
    return None


def require(module: str, needed_by: str) -> None:
    """A ConfigError naming what needs ``module`` and how to install it, when it is not installed."""
    if not installed(module):
        raise ConfigError(f"{needed_by} needs {module}, which is not installed: {install_hint(module)}")
