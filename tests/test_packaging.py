"""Packaging rules: import boundaries, console scripts, README and CI agreement."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("gradio", "ray", "lightning", "pytorch_lightning", "sqlalchemy")

# The rest of LungViT, which core must not import (core is the layer the others build on).
OTHER_LAYERS = ("lungvit.training", "lungvit.app", "lungvit.cli", "lungvit.synthetic")

# A child interpreter that makes the forbidden packages and LungViT's other layers
# unimportable, then imports every module of lungvit.core. An import of any of them
# anywhere in core (directly, by importlib, or through another library) fails loudly
# instead of passing silently.
_PROBE = r"""
import importlib, pkgutil, sys
FORBIDDEN = {forbidden!r}
LAYERS = {layers!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("lungvit.core imported forbidden package " + name)
        if any(name == layer or name.startswith(layer + ".") for layer in LAYERS):
            raise ImportError("lungvit.core imported another layer: " + name)
        return None

sys.meta_path.insert(0, Block())
import lungvit.core
for info in pkgutil.walk_packages(lungvit.core.__path__, "lungvit.core."):
    importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
assert not loaded, loaded
print("ok")
"""


def _probe(extra: str = "") -> subprocess.CompletedProcess[str]:
    code = _PROBE.format(forbidden=FORBIDDEN, layers=OTHER_LAYERS) + extra
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)


def test_core_imports_without_app_or_training_dependencies() -> None:
    out = _probe()
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize(("statement", "message"), [
    ("import gradio", "forbidden package gradio"),
    ("import importlib; importlib.import_module('lungvit.training.jobs.runner')",
     "another layer: lungvit.training"),
    ("import lungvit.cli.main", "another layer: lungvit.cli"),
])
def test_probe_detects_a_forbidden_import(statement: str, message: str) -> None:
    """The probe above must be able to fail: each of these is refused."""
    out = _probe("\n" + statement + "\n")
    assert out.returncode != 0
    assert message in out.stderr


_DYNAMIC = re.compile(r"(import_module|__import__|find_spec)\(\s*[\"']([\w.]+)")


def test_core_names_no_other_layer_to_import_later() -> None:
    """Imports the probe cannot see (a function that imports another layer only when it
    runs): no module of core names one to importlib or ``__import__``, nor imports one
    inside a function."""
    found = []
    for path in sorted((ROOT / "core").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in _DYNAMIC.finditer(text):
            if match.group(2).startswith(OTHER_LAYERS):
                found.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
        for line in text.splitlines():
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1 \
                    and words[1].startswith(OTHER_LAYERS):
                found.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not found, found


def test_no_generic_top_level_packages_installed() -> None:
    import lungvit.core

    assert Path(lungvit.core.__file__).parent.name == "core"
    for generic in ("core", "app", "training", "cli", "synthetic"):
        with pytest.raises(ModuleNotFoundError):
            __import__(generic)


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert m, "README.md must mark its test command with <!-- test-command -->"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_test_command() in ci.splitlines()


def test_console_scripts_answer_help() -> None:
    bindir = Path(sys.executable).parent
    out = subprocess.run([str(bindir / "lungvit"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for cmd in ("inspect", "demo-data"):
        assert cmd in out.stdout
