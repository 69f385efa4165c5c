"""The app and the command line change the tracking store only through the job API.

:mod:`lungvit.training.jobs.runner` (``launch_job``, ``cancel_job``, ``promote_result``,
``resume_job``, ...) is where a store write of theirs happens; they read the store
directly. This is checked statically: no module of ``app/`` or ``cli/`` calls a method of
:class:`~lungvit.training.store.Store` that writes.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB_API = "lungvit.training.jobs.runner"


def store_write_methods() -> set[str]:
    """The methods of ``Store`` (and of its classes in the store package) that open a write
    transaction (``self._db.write()``)."""
    from lungvit.training.store import Store

    found = set()
    for cls in Store.__mro__:
        if not cls.__module__.startswith("lungvit.training.store"):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        for fn in tree.body[0].body:
            if isinstance(fn, ast.FunctionDef) and any(
                    isinstance(n, ast.Attribute) and n.attr == "write"
                    and isinstance(n.value, ast.Attribute) and n.value.attr == "_db"
                    for n in ast.walk(fn)):
                found.add(fn.name)
    return found


WRITES = store_write_methods()


def _job_api_aliases(tree: ast.Module) -> set[str]:
    """Names under which a module imports the job API module (its functions share some
    names with the store's methods, e.g. ``create_job``)."""
    parent, _, leaf = JOB_API.rpartition(".")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == parent:
            names |= {a.asname or a.name for a in node.names if a.name == leaf}
        elif isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == JOB_API and a.asname}
    return names


def store_writes(source: str) -> list[str]:
    """``line: call`` of every call of a store-writing method in ``source``."""
    tree = ast.parse(source)
    api = _job_api_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in WRITES):
            continue
        receiver = node.func.value
        if isinstance(receiver, ast.Name) and receiver.id in api:
            continue  # jobs.create_job(...): the job API itself
        found.append(f"{node.lineno}: {ast.unparse(node.func)}(...)")
    return found


def test_the_write_methods_are_found() -> None:
    """The list the scan uses comes from the store itself, and is not empty or partial."""
    assert {"create_job", "set_status", "start_attempt", "request_cancel", "promote",
            "add_event", "record_metrics", "record_checkpoint", "set_result",
            "mark_stale_interrupted"} <= WRITES
    assert not WRITES & {"get_job", "list_jobs", "metrics", "events", "checkpoints",
                         "final_metrics", "is_cancel_requested"}


def test_app_and_cli_write_the_store_only_through_the_job_api() -> None:
    found = []
    for folder in ("app", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}:{hit}"
                      for hit in store_writes(path.read_text(encoding="utf-8"))]
    assert not found, f"store writes outside {JOB_API}: {found}"


@pytest.mark.parametrize(("source", "hits"), [
    ("with _store(ctx) as store:\n    store.request_cancel(1)\n",
     ["2: store.request_cancel(...)"]),
    ("open_store(url).promote(job.id, 3)\n", ["1: open_store(url).promote(...)"]),
    ("def f(s):\n    s.add_event(1, 'hi')\n    return s.get_job(1)\n",
     ["2: s.add_event(...)"]),
    ("from lungvit.training.jobs import runner as jobs\njobs.create_job({}, db_url=u)\n"
     "jobs.cancel_job(1)\n", []),
    ("import lungvit.training.jobs.runner as r\nr.create_job({})\nstore.create_job({})\n",
     ["3: store.create_job(...)"]),
    ("with open_store(u) as store:\n    store.get_job(1)\n    store.metrics(1)\n", []),
])
def test_the_scan_finds_writes_and_only_writes(source: str, hits: list[str]) -> None:
    """The scan above must be able to fail: these snippets' writes are found."""
    assert store_writes(source) == hits
