"""Packaging rules: import boundaries, console scripts, README and CI agreement."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("gradio", "ray", "lightning", "pytorch_lightning", "sqlalchemy")

# A child interpreter that makes the forbidden packages unimportable, then imports every
# module of lungvit.core. An import of any of them anywhere in core (directly or through
# another library) fails loudly instead of passing silently.
_PROBE = r"""
import importlib, pkgutil, sys
FORBIDDEN = {forbidden!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("lungvit.core imported forbidden package " + name)
        return None

sys.meta_path.insert(0, Block())
import lungvit.core
for info in pkgutil.walk_packages(lungvit.core.__path__, "lungvit.core."):
    importlib.import_module(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
assert not loaded, loaded
print("ok")
"""


def test_core_imports_without_app_or_training_dependencies() -> None:
    code = _PROBE.format(forbidden=FORBIDDEN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_probe_detects_a_forbidden_import() -> None:
    """The probe above must be able to fail: importing gradio through it is refused."""
    code = _PROBE.format(forbidden=FORBIDDEN) + "\nimport gradio\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "forbidden package gradio" in out.stderr


def test_no_generic_top_level_packages_installed() -> None:
    import lungvit.core

    assert Path(lungvit.core.__file__).parent.name == "core"
    for generic in ("core", "app", "training"):
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
