"""What a new user's machine needs is what the project declares (issue: "A new user's machine runs it").

* every third-party package imported by the project's code is declared in ``pyproject.toml``:
  module-level imports of the runtime packages in ``[project].dependencies`` (a plain install must
  serve), imports inside functions (optional paths) and those of ``ops/``/tests in a dependency or
  an extra. This is checked on the source, so a package installed by hand on the test machine
  (how ``soxr`` went missing) cannot hide a missing declaration;
* every module of ``avatar_server``, ``streaming``, ``engine``, ``clients`` and ``ops`` imports in
  the environment the tests run in;
* ``pip check`` finds no broken requirement there.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("avatar_server", "streaming", "engine", "clients")
ALL_PACKAGES = (*RUNTIME_PACKAGES, "ops")
LOCAL = {*ALL_PACKAGES, "tests"}

# Modules that belong to an optional extra: their module-level imports may come from that extra.
OPTIONAL_MODULES = {
    "avatar_server/fleet.py": "fleet",
    "clients/pipecat": "pipecat",
}
# Imported only on the user's own machine, never installable here; each names why.
NOT_INSTALLABLE_HERE = {
    "tensorrt": "NVIDIA TensorRT: needs CUDA, installed by the user for the tensorrt backend (lazy import)",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[\s<>=!~\[;(]", requirement.strip(), maxsplit=1)[0])


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_requirement_name(r) for r in project["dependencies"]}
    extras = {
        extra: {_requirement_name(r) for r in reqs if _requirement_name(r) != "avatar-server"}
        for extra, reqs in project.get("optional-dependencies", {}).items()
    }
    return runtime, extras


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module name, imported at module level) for each absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            nested.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.append((name.split(".")[0], id(node) not in nested))
    return found


def _distributions(module: str) -> set[str]:
    return {_normalise(d) for d in importlib.metadata.packages_distributions().get(module, [])}


def test_every_third_party_import_is_declared() -> None:
    runtime, extras = _declared()
    any_extra = set().union(*extras.values()) if extras else set()
    stdlib = set(sys.stdlib_module_names)
    problems = []
    for package in (*ALL_PACKAGES, "tests"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            extra = next((e for prefix, e in OPTIONAL_MODULES.items() if rel.startswith(prefix)), None)
            for module, module_level in _imports(path):
                if module in stdlib or module in LOCAL or module in NOT_INSTALLABLE_HERE:
                    continue
                dists = _distributions(module)
                if not dists:
                    problems.append(f"{rel}: imports {module!r}, which no installed distribution provides")
                    continue
                if package in RUNTIME_PACKAGES and module_level and extra is None:
                    allowed = runtime
                    where = "[project].dependencies"
                elif extra is not None and module_level:
                    allowed = runtime | extras.get(extra, set())
                    where = f"[project].dependencies or the [{extra}] extra"
                else:
                    allowed = runtime | any_extra
                    where = "[project].dependencies or an extra"
                if not dists & allowed:
                    problems.append(f"{rel}: imports {module!r} (distribution {sorted(dists)}) not in {where}")
    assert not problems, "undeclared imports:\n" + "\n".join(sorted(set(problems)))


def test_the_check_sees_an_undeclared_import(tmp_path: Path) -> None:
    """The scan above would have caught soxr: a module-level import of a distribution that
    ``[project].dependencies`` lacks is reported, one inside a function is not held to it."""
    source = tmp_path / "m.py"
    source.write_text("import soxr\n\ndef f():\n    import onnx\n")
    assert _imports(source) == [("soxr", True), ("onnx", False)]
    assert "soxr" in _distributions("soxr")
    runtime, _ = _declared()
    assert "soxr" in runtime


def test_every_module_imports() -> None:
    """Each module of the five packages imports in this environment (a fresh interpreter, so no
    module already imported by another test hides a failure)."""
    script = (
        "import importlib, pkgutil, sys, traceback\n"
        f"packages = {list(ALL_PACKAGES)!r}\n"
        "failed = []\n"
        "for name in packages:\n"
        "    pkg = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, name + '.'):\n"
        "        if info.name.endswith('__main__'):\n"
        "            continue\n"
        "        try:\n"
        "            importlib.import_module(info.name)\n"
        "        except Exception as exc:\n"
        "            failed.append(f'{info.name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"modules that do not import:\n{proc.stdout}{proc.stderr[-2000:]}"


def test_pip_check_finds_no_broken_requirement() -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not installed in this environment")
    assert proc.returncode == 0, proc.stdout + proc.stderr
