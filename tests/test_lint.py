"""The lint of the whole tree (ruff, configured in pyproject.toml) runs with the tests."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    return [found]


def _check(*paths: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_ruff(), "check", "--no-cache", "--output-format", "concise", *paths],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_tree_passes_the_lint() -> None:
    result = _check(".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_lint_finds_what_it_is_configured_for(tmp_path: Path) -> None:
    # The project's configuration, applied to a file with one of each kind of finding.
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "bad.py").write_text(
        "import os\n"                      # F401 unused import
        "x = undefined_name\n"            # F821 undefined name
        f"y = '{'a' * 130}'\n"            # E501 over the line length
    )
    out = _check("bad.py", cwd=tmp_path).stdout
    for code in ("F401", "F821", "E501"):
        assert code in out, out
