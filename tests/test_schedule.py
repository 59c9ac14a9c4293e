"""The suite's module order on the xdist workers (tests/schedule.py)."""
from tests.schedule import longest_first


def test_modules_run_longest_first_with_their_tests_together_and_unknown_ones_first():
    nodeids = ["tests/a.py::t1", "tests/a.py::t2", "tests/b.py::t1", "tests/new.py::t1", "tests/c.py::t1",
               "tests/c.py::t2"]
    seconds = {"tests/a.py": 5.0, "tests/b.py": 1.0, "tests/c.py": 60.0}
    assert [nodeids[i] for i in longest_first(nodeids, seconds)] == [
        "tests/new.py::t1", "tests/c.py::t1", "tests/c.py::t2", "tests/a.py::t1", "tests/a.py::t2", "tests/b.py::t1"]
    assert longest_first(nodeids, {}) == list(range(len(nodeids)))  # nothing recorded: the files' order
