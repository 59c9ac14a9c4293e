"""The README and docs/ stay true: docs/cli.md is what the generator writes, every link resolves
(files and heading anchors), and every command of a job is accepted by that job's own parser."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"-m\s+(engine\.cli\.\w+|tools\.convert\.\w+|tools\.plan(?:\.cli)?)(?=\s|$)")


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def _code_lines(page: Path) -> list[str]:
    """The logical lines (continuations joined) of the page's indented code blocks."""
    lines, current = [], ""
    for raw in page.read_text().splitlines():
        if not raw.startswith("    "):
            current = ""
            continue
        text = raw.strip()
        if text.startswith("#"):  # a comment line of the block
            continue
        current += " " + text.rstrip("\\").rstrip()
        if not text.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


def _commands() -> list[tuple[str, str, str]]:
    """(page, module, the arguments after ``-m module``) of every job command in the docs."""
    found = []
    for page in PAGES:
        for line in _code_lines(page):
            match = COMMAND.search(line)
            if match:
                found.append((page.name, match.group(1), line[match.end():]))
    return found


def _concrete(arguments: str) -> list[str]:
    """The command as a user would first run it: optional ``[...]`` parts, ``...`` and trailing
    ``# comments`` left out."""
    text = re.sub(r"\s+#\s.*$", "", arguments)
    while re.search(r"\[[^\[\]]*\]", text):
        text = re.sub(r"\s*\[[^\[\]]*\]", "", text)
    return [token for token in shlex.split(text) if token != "..."]


def test_cli_reference_is_what_the_generator_writes():
    from tools.cli_docs import CLI_MD, render

    assert CLI_MD.read_text() == render(), "docs/cli.md is stale: run python -m tools.cli_docs"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"https?://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: link to missing {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{page.name}: no heading for #{anchor} in {resolved.name}"


def _job_parsers() -> dict[str, object]:
    from tools.cli_docs import CLIS, job_class

    parsers = {module: job_class(module, cls) for module, cls in CLIS}
    parsers["tools.plan"] = parsers["tools.plan.cli"]
    return parsers


def test_every_documented_command_parses_with_its_jobs_parser(capsys):
    from engine.cli.options import parse_job

    jobs = _job_parsers()
    commands = _commands()
    assert len(commands) >= 20, commands  # the pages really hold commands
    failures = []
    for page, module, arguments in commands:
        try:
            parse_job(jobs[module], _concrete(arguments))
        except (SystemExit, ValueError) as err:
            failures.append(f"{page}: python -m {module} {arguments.strip()}\n    -> {err!r} "
                            f"{capsys.readouterr().err.strip()[-300:]}")
    assert not failures, "\n".join(failures)
