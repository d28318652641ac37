"""The installed distribution: one import namespace, and a ``validate`` that starts neither Ray nor MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import hpmkd

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"hpmkd": "hpmkd", "hpmkd.components": "components", "hpmkd.pipelines": "pipelines"}


def test_every_package_folder_is_installed_under_the_hpmkd_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == FOLDERS
    found = set()
    for name, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            if not any(part.startswith(".") or part == "__pycache__" for part in relative):
                found.add(".".join((name, *relative)))
    assert set(setuptools["packages"]) == found
    assert all(p == "hpmkd" or p.startswith("hpmkd.") for p in setuptools["packages"])


def test_components_and_pipelines_import_under_hpmkd():
    import hpmkd.components.graph
    import hpmkd.pipelines

    assert Path(hpmkd.components.graph.__file__).parent == ROOT / "components"
    assert Path(hpmkd.pipelines.__file__).parent == ROOT / "pipelines"
    assert hpmkd.__name__ == "hpmkd"


def test_validate_imports_neither_ray_nor_mlflow():
    code = ("import json, sys; from hpmkd.cli import main; code = main(['validate', 'conf/default.yaml']); "
            "print(json.dumps({'code': code, 'ray': 'ray' in sys.modules, 'mlflow': 'mlflow' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "ray": False, "mlflow": False}
