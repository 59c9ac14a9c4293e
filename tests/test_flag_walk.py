"""Every flag a CLI accepts is read by code that CLI can run.

For each job, the flags are its configs' option fields minus its exclusions (test_options.py
checks that mapping); the code it can run is every module of ours its CLI module reaches through
imports, function-level ones included. A field that no such module reads (``.name``, or its name
as a string for ``getattr``) is a flag parsed and then dropped. The check is static: it catches a
field nothing reads, not one read only on a path the job never takes (per-job exclusions and the
OpenRLHF table cover those by hand).
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest

from engine.cli.options import GROUP, GroupInfo
from parallel.options import option, option_info
from tests.test_options import JOBS

REPO = Path(__file__).resolve().parents[1]
OURS = ("engine", "models", "parallel", "tools")
REGISTERED = re.compile(r"^(engine|models|parallel|tools)(\.\w+)+(:\w+)?$")


def _module_file(name: str) -> Path | None:
    for path in (REPO / f"{name.replace('.', '/')}.py", REPO / name.replace(".", "/") / "__init__.py"):
        if path.exists():
            return path
    return None


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and REGISTERED.match(node.value):
            yield node.value.split(":")[0]  # a registry entry ("module" or "module:attribute"), imported by name


def reachable_source(module: str) -> str:
    """The source of every module of ours ``module`` reaches through imports."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo += [i for i in _imports(path) if i.split(".")[0] in OURS]
    return "\n".join(_module_file(name).read_text() for name in sorted(seen))


def _option_fields(cls, path=()):
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        dotted = ".".join((*path, field.name))
        if option_info(field) is not None:
            yield dotted, field.name
        elif isinstance(hints[field.name], type) and dataclasses.is_dataclass(hints[field.name]):
            yield from _option_fields(hints[field.name], (*path, field.name))


def unread_flags(job_cls, source: str) -> list[str]:
    excluded = {f"{f.name}.{path}" for f in dataclasses.fields(job_cls)
                for path in (f.metadata.get(GROUP) or GroupInfo()).exclude}
    return [dotted for dotted, name in _option_fields(job_cls)
            if dotted not in excluded and not re.search(rf"\.{name}\b|[\"']{name}[\"']", source)]


@pytest.mark.parametrize("module", sorted(JOBS))
def test_every_flag_is_read_by_code_the_job_runs(module):
    job_cls = getattr(importlib.import_module(module), JOBS[module])
    assert unread_flags(job_cls, reachable_source(module)) == []


@dataclasses.dataclass(kw_only=True)
class _DroppedSettings:
    parsed_and_dropped_flag: int = option(0, help="read by nothing")


@dataclasses.dataclass(kw_only=True)
class _JobWithADroppedFlag:
    settings: _DroppedSettings = dataclasses.field(default_factory=_DroppedSettings)


def test_the_walk_finds_a_flag_nothing_reads():
    source = reachable_source("engine.cli.train_sft")
    assert unread_flags(_JobWithADroppedFlag, source) == ["settings.parsed_and_dropped_flag"]
