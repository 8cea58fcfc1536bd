"""ssl-foundry installs anywhere: ``pip install <checkout>[dali,deepspeed,video]`` into a new venv
outside the checkout (nothing editable, no system site-packages), then `foundry --help`,
`foundry --version`, ``import ssl_foundry`` and a 3-step pretraining run from that venv.

The dependencies are the ones scripts/setup.sh installed from requirements.txt into the test's own
environment (a clean install of them unpacks 7.3 GB, so they are not installed twice): the new venv
sees them through a .pth file pointing at a view of that environment's site-packages without
ssl-foundry itself (symlinks, no copy). pip then installs the checkout into the new venv with no
index and no pip configuration: it builds the wheel, resolves every declared dependency and extra
against what is installed (a missing or unresolvable one fails), and the console script and the
package outside the checkout are real.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env, write_recipe

EXTRAS = "dali,deepspeed,video"


def site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def dependencies_view(folder: Path) -> Path:
    """This environment's site-packages folders (its own and any a .pth file adds), first one
    first, without ssl-foundry (its dist-info and editable finder)."""
    folder.mkdir()
    for site_dir in (Path(p) for p in sys.path if Path(p).name == "site-packages"):
        for entry in site_dir.iterdir():
            view = folder / entry.name
            if not (entry.name.startswith(("ssl_foundry", "__editable__", "_ssl_foundry")) or view.exists()):
                view.symlink_to(entry)
    return folder


@pytest.mark.slow
def test_pip_install_into_a_new_venv_gives_a_working_foundry(fmnist, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    (site_packages(venv) / "dependencies.pth").write_text(f"{dependencies_view(tmp_path / 'deps')}\n")
    # pip from this environment installs into the new one (--python); no config: no find-links, no index.
    done = subprocess.run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-index",
                           "--no-build-isolation", f"{REPO}[{EXTRAS}]"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Everything else resolved from the dependencies.
    assert done.stdout.split("Successfully installed ")[1].split() == ["ssl-foundry-0.1.0"]
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
