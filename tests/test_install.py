"""ssl-foundry installs anywhere: ``pip install <checkout>[dali,deepspeed,video]`` into a new venv
outside the checkout (nothing editable, no system site-packages), then `foundry --help`,
`foundry --version`, ``import ssl_foundry`` and a 3-step pretraining run from that venv.

A fully clean install unpacks 7.3 GB (torch with its CUDA libraries, DALI, ...): 5.5 min on a
2-core machine, with another 7 min to download the wheels. So it is made once per pyproject.toml +
requirements.txt and kept in ~/.cache/ssl-foundry/install/<hash>: ``wheels/`` (``pip download`` at
requirements.txt's versions, DeepSpeed's source built into a wheel) and ``deps/``, a venv made by
``pip install --no-index --find-links wheels <checkout>[extras]`` with ssl-foundry then uninstalled
again, i.e. exactly the packages pip resolved for this pyproject.toml. The test's new venv sees
those through a .pth file, and pip installs the checkout into it from the wheels alone: building
the wheel, resolving every declared dependency and extra against what is installed (a missing or
unresolvable one fails), the console script and the package outside the checkout are real.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env, write_recipe

EXTRAS = "dali,deepspeed,video"
DEEPSPEED_VERSION = "0.19.8"  # scripts/setup.sh installs the same
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ssl-foundry" / "install"


def site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def installed_dependencies() -> tuple[Path, Path]:
    """(wheels, deps venv) for this checkout's pyproject.toml and requirements.txt, made once."""
    key = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in ("pyproject.toml", "requirements.txt"))
                         + DEEPSPEED_VERSION.encode()).hexdigest()[:16]
    root = CACHE / key
    wheels, deps = root / "wheels", root / "deps"
    if (root / ".complete").is_file():
        return wheels, deps
    shutil.rmtree(root, ignore_errors=True)
    wheels.mkdir(parents=True)
    constraints = root / "constraints.txt"
    pins = re.sub(r"\[[^\]]*\]", "", (REPO / "requirements.txt").read_text())  # a constraint names no extras
    constraints.write_text(f"{pins}\ndeepspeed=={DEEPSPEED_VERSION}\n")
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "--quiet", "-d", wheels, "-c", constraints, f"{REPO}[{EXTRAS}]",
                    "setuptools>=77"], check=True, cwd=root)
    for sdist in wheels.glob("*.tar.gz"):  # DeepSpeed ships source only: a wheel without prebuilt ops
        subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels, sdist],
                       check=True, cwd=root, env={**os.environ, "DS_BUILD_OPS": "0"})
        sdist.unlink()
    subprocess.run([sys.executable, "-m", "venv", deps], check=True)
    subprocess.run([deps / "bin" / "pip", "install", "--quiet", "--no-index", "--find-links", wheels,
                    f"{REPO}[{EXTRAS}]"], check=True, cwd=root)
    subprocess.run([deps / "bin" / "pip", "uninstall", "--quiet", "--yes", "ssl-foundry"], check=True)
    (root / ".complete").touch()
    return wheels, deps


@pytest.mark.slow
def test_pip_install_into_a_new_venv_gives_a_working_foundry(fmnist, tmp_path):
    wheels, deps = installed_dependencies()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    (site_packages(venv) / "dependencies.pth").write_text(f"{site_packages(deps)}\n")
    done = subprocess.run([venv / "bin" / "pip", "install", "--no-index", "--find-links", wheels,
                           f"{REPO}[{EXTRAS}]"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    installed = done.stdout.split("Successfully installed ")[1].split()
    # Everything else resolved from the dependencies (a venv's own old setuptools may be upgraded: torch needs it).
    assert "ssl-foundry-0.1.0" in installed and {name.rsplit("-", 1)[0] for name in installed} <= {
        "ssl-foundry", "setuptools"}
    env = subprocess_env(tmp_path)

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=tmp_path, env=env, capture_output=True, text=True)

    done = run(venv / "bin" / "python", "-c", "import ssl_foundry, ssl_foundry.launch.cli, av, deepspeed, nvidia.dali; "
                                               "print(ssl_foundry.launch.cli.__file__)")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.splitlines()[-1]).is_relative_to(site_packages(venv))  # the installed copy, not the checkout
    done = run(venv / "bin" / "foundry", "--help")
    assert done.returncode == 0 and "pretrain" in done.stdout and "bench" in done.stdout
    done = run(venv / "bin" / "foundry", "--version")
    assert done.returncode == 0 and done.stdout.strip() == "foundry 0.1.0"

    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "run")
    done = run(venv / "bin" / "foundry", "pretrain", recipe, "train.max_steps=3")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 3 and Path(result["backbone_dir"], "model.safetensors").is_file()


@pytest.mark.parametrize("module, argv, message", [
    ("av", ["prep", "video", "{tmp}", "{tmp}/out"], "foundry prep: av is not installed: pip install 'ssl-foundry[video]'"),
    ("deepspeed", ["pretrain", "{recipe}", "train.strategy=deepspeed", "train.optimizer=adamw"],
     "config error: train.strategy=deepspeed needs deepspeed, which is not installed: "
     "pip install 'ssl-foundry[deepspeed]'"),
    ("nvidia", ["pretrain", "{recipe}", "data.backend=dali"],
     "config error: data.backend=dali needs nvidia.dali, which is not installed: pip install 'ssl-foundry[dali]'"),
])
def test_a_missing_optional_part_names_its_extra(module, argv, message, fmnist, tmp_path):
    """The CLI in a process where ``module`` cannot be imported (``sys.modules[module] = None`` makes
    Python's import of it fail, as for a package that is not installed)."""
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist, tmp_path / "run")
    args = [a.format(tmp=tmp_path, recipe=recipe) for a in argv]
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from ssl_foundry.launch.cli import main\nsys.exit(main({args!r}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(tmp_path), capture_output=True,
                          text=True)
    assert done.returncode in (1, 2) and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
