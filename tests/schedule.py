"""The order in which the two pytest-xdist workers take the test modules: longest first.

``--dist loadfile`` hands a worker a whole module when it runs low on work. xdist's own order is
by number of tests, which left the few-test, minutes-long modules (the launchers, the RL runs) to
the end, one worker busy and the other idle. Longest-processing-time-first order, from the module
times of a recorded run (``tests/module_seconds.json``), packs the two workers evenly;
``scripts/test.sh`` passes ``--no-loadscope-reorder`` so xdist keeps this order.

``RECORD_MODULE_SECONDS=1 bash scripts/test.sh`` rewrites the file from that run (setup, call and
teardown time per module) when the whole suite ran (passed or failed, not interrupted). A module
the file does not know yet goes first (it may be long).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

RECORD = Path(__file__).with_name("module_seconds.json")
_seconds: dict[str, float] = defaultdict(float)


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def recorded_seconds() -> dict[str, float]:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


def longest_first(nodeids: list[str], seconds: dict[str, float]) -> list[int]:
    """Indices of ``nodeids`` with modules in decreasing recorded time, each module's tests in their
    order (a stable sort on a per-module key keeps a module's tests together)."""
    unknown = max(seconds.values(), default=0.0) + 1.0
    return sorted(range(len(nodeids)), key=lambda i: -seconds.get(_module(nodeids[i]), unknown))


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):  # one process: the files' order
        return
    order = longest_first([item.nodeid for item in items], recorded_seconds())
    items[:] = [items[i] for i in order]


def pytest_runtest_logreport(report):
    _seconds[_module(report.nodeid)] += report.duration


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not os.environ.get("RECORD_MODULE_SECONDS"):
        return
    if exitstatus not in (0, 1):  # interrupted or broken: the times of a part of the suite
        return
    RECORD.write_text(json.dumps({m: round(s, 1) for m, s in sorted(_seconds.items())}, indent=1) + "\n")
