"""The install layout: one namespaced package, and the engine free of the web stack."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"radixserve": "radixserve", "engine": "radixserve.engine", "kernels": "radixserve.kernels",
           "cluster": "radixserve.cluster", "benchmarks": "radixserve.benchmarks"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_installed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_package_dir_maps_the_fixed_layout():
    assert _pyproject()["tool"]["setuptools"]["package-dir"] == {v: k for k, v in FOLDERS.items()}


def test_engine_and_kernels_import_without_ray_or_fastapi(tmp_path):
    # Blocks the web stack, then imports every engine and kernels module (outside the checkout).
    code = """
import importlib, pkgutil, sys
for name in ("ray", "fastapi", "starlette", "uvicorn", "pydantic"):
    sys.modules[name] = None
import radixserve.engine, radixserve.kernels
for pkg in (radixserve.engine, radixserve.kernels):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not mod.name.endswith(".__main__"):
            importlib.import_module(mod.name)
from radixserve import LLM, SamplingParams
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


# The router and the HTTP layer hash prompts and carry SamplingParams, and the cache, the
# scheduler and the wire protocol are plain bookkeeping: none of them may need torch.
LIGHT_MODULES = [
    "radixserve.engine.sampling_params", "radixserve.engine.config",
    "radixserve.engine.core.scheduler", "radixserve.engine.core.scheduler_output",
    "radixserve.engine.core.detokenizer", "radixserve.engine.executor.wire", "radixserve.engine.executor.protocol",
    "radixserve.cluster.replica_wire", "radixserve.cluster.openai_api.protocol",
]
# The cache's transfer thread copies tensors: the one cache module that needs torch.
CACHE_WITH_TORCH = {"radixserve.engine.cache.transfer"}


def test_light_modules_do_not_import_torch(tmp_path):
    code = f"""
import importlib, pkgutil, sys
sys.modules["torch"] = None
import radixserve.engine.cache as cache
for mod in pkgutil.iter_modules(cache.__path__, cache.__name__ + "."):
    if mod.name not in {CACHE_WITH_TORCH!r}:
        importlib.import_module(mod.name)
for name in {LIGHT_MODULES!r}:
    importlib.import_module(name)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_console_script_and_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "radixserve", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout, r.stderr
    assert _pyproject()["project"]["scripts"]["radixserve"] == "radixserve.cli:main"
