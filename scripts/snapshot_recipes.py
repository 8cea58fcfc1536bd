"""Write every recipe of configs/ at a git revision, as the flat YAML tree it held there, to JSON:
the fixture tests/test_starting.py checks the composed recipes against (each must build the same
Config as its flat twin).

    python scripts/snapshot_recipes.py REV > tests/fixtures/flat_recipes.json
"""
import json
import subprocess
import sys

import yaml


def flat_recipes(rev: str) -> dict[str, dict]:
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:configs"], capture_output=True, text=True,
                           check=True).stdout.split()
    return {name[:-len(".yaml")]: yaml.safe_load(subprocess.run(
        ["git", "show", f"{rev}:configs/{name}"], capture_output=True, text=True, check=True).stdout)
        for name in sorted(names) if name.endswith(".yaml")}


if __name__ == "__main__":
    rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
    json.dump({"revision": subprocess.run(["git", "rev-parse", rev], capture_output=True, text=True,
                                          check=True).stdout.strip(), "recipes": flat_recipes(rev)},
              sys.stdout, indent=1, sort_keys=True)
    print()
