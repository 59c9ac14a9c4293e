"""The GPU check for the machine this project is lent: one H100 / H200, Python 3.12, torch 2.11
(CUDA 13) and transformers preinstalled, no network, no vLLM / Ray / Transformer Engine / flash-attn.

    bash scripts/device_check.sh [--dry-run] [--only train_step,ring_attention]
    python -m tools.device_check [--dry-run] [--only ...] [--json PATH] [--smoke]

Runs the checks of ``tools.device_checks`` one after another, each in its own process group with
its own timeout (a timed-out check is killed with everything it started), inside a total budget
(default 450 s). Prints one PASS / FAIL / SKIP line per check, writes a JSON summary to
``$OUT/device_check.json`` when ``OUT`` is set (or to ``--json``), and exits 1 on any FAIL. Without
a usable CUDA device every check is SKIP, with the cause (``tools.cuda_preflight``); ``--smoke``
runs them anyway, which on a CPU means tiny sizes (the checks' own CI test).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Seconds per check on one H100 / H200, with room for a slow start (imports, CUDA context).
TIMEOUTS_S = {"train_step": 130, "packing_moe": 100, "hf_logits": 70, "lora_offload": 80, "ring_attention": 60}
TOTAL_BUDGET_S = 450  # under 8 minutes in all; scripts/device_check.sh adds a hard limit around it
MIN_START_S = 20  # a check that would get less than this is skipped, not started
RESULT_PREFIX = "RESULT "


@dataclass
class Outcome:
    name: str
    status: str  # PASS / FAIL / SKIP
    detail: str
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail} ({self.seconds:.0f} s)"


def plan(names: list[str]) -> list[tuple[str, int]]:
    """The checks to run and the timeout of each (the total budget still holds: ``run_all`` gives
    each check at most what is left of it). Unknown names are an error naming them."""
    unknown = [n for n in names if n not in TIMEOUTS_S]
    if unknown:
        raise ValueError(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(TIMEOUTS_S)}")
    return [(n, TIMEOUTS_S[n]) for n in names]


def child_command(name: str, workdir: str, *, smoke: bool) -> list[str]:
    return [sys.executable, "-m", "tools.device_check", "--child", name, "--workdir", workdir,
            *(["--smoke"] if smoke else [])]


# ----- one check in a child process ------------------------------------------------------------
def run_one(name: str, workdir: Path) -> Outcome:
    """One check in this process: PASS with its detail, SKIP where the machine lacks something, FAIL."""
    from tools import device_checks
    from tools.device_wheels import CARRIED_MODULES

    check, _ = device_checks.CHECKS[name]
    try:
        detail, metrics = check(workdir)
        return Outcome(name, "PASS", detail, metrics=metrics)
    except device_checks.Skip as skip:
        return Outcome(name, "SKIP", str(skip))
    except Exception as error:  # noqa: BLE001 - every failure becomes the check's FAIL line
        missing = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
        if missing and missing.split(".")[0] in CARRIED_MODULES:
            return Outcome(name, "SKIP", f"{missing} is not installed: run scripts/fetch_device_wheels.sh and "
                                         "carry .device_wheels/")
        # Anything else missing is a bug of ours (e.g. the training path importing vLLM): FAIL.
        import traceback

        traceback.print_exc()
        return Outcome(name, "FAIL", f"{type(error).__name__}: {error}"[:2000])


def run_child(names: list[str], workdir: Path) -> int:
    """Run checks in this process and print one RESULT line each (JSON)."""
    failed = 0
    for name in names:
        start = time.perf_counter()
        outcome = run_one(name, workdir)
        outcome.seconds = time.perf_counter() - start
        failed += outcome.status == "FAIL"
        print(RESULT_PREFIX + json.dumps(asdict(outcome)), flush=True)
    return 1 if failed else 0


def parse_result(output: str, name: str, returncode: int) -> Outcome:
    """The child's RESULT line, or a FAIL carrying the end of its output when it died without one."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return Outcome(**json.loads(line[len(RESULT_PREFIX):]))
    return Outcome(name, "FAIL", f"exit {returncode} without a result; last output:\n{output[-3000:]}")


def run_in_group(command: list[str], timeout_s: float) -> tuple[int | None, str]:
    """Run ``command`` as the leader of a new process group; on timeout kill the whole group (a
    check's own children, e.g. torchrun ranks, must not keep the GPU for the next check).
    Returns (exit code or None on timeout, combined output)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ))
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return None, output


# ----- the driver ------------------------------------------------------------------------------
def preflight(smoke: bool) -> str | None:
    """None when the checks can run; else why every check is skipped."""
    if smoke:
        return None
    from tools.cuda_preflight import diagnose, facts_here

    verdict = diagnose(facts_here())
    return None if verdict.usable else verdict.message


def run_all(checks: list[tuple[str, int]], workdir: str, *, smoke: bool, budget_s: float,
            log_dir: Path | None) -> list[Outcome]:
    outcomes, deadline = [], time.monotonic() + budget_s
    for name, timeout_s in checks:
        left = deadline - time.monotonic()
        if left < MIN_START_S:
            outcome = Outcome(name, "SKIP", f"no time left in the {budget_s:.0f} s budget")
        else:
            limit = min(timeout_s, left)
            start = time.perf_counter()
            code, output = run_in_group(child_command(name, workdir, smoke=smoke), limit)
            if code is None:
                outcome = Outcome(name, "FAIL", f"over its {limit:.0f} s limit (process group killed); last "
                                                f"output:\n{output[-2000:]}")
            else:
                outcome = parse_result(output, name, code)
            outcome.seconds = time.perf_counter() - start
            if log_dir is not None:
                (log_dir / f"device_check_{name}.log").write_text(output)
        print(outcome.line(), flush=True)
        outcomes.append(outcome)
    return outcomes


def environment() -> dict:
    import platform

    import torch

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if cuda else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(TIMEOUTS_S), help="comma-separated checks to run")
    parser.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    parser.add_argument("--smoke", action="store_true",
                        help="run even without CUDA (a CPU runs the checks at tiny sizes: their own test)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all checks together")
    parser.add_argument("--json", default=None, help="summary path (default: $OUT/device_check.json if OUT is set)")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="device_check_")
    names = [n for n in args.only.split(",") if n]
    if args.child:
        return run_child(args.child.split(","), Path(workdir))
    checks = plan(names)
    if args.dry_run:
        from tools.device_checks import CHECKS

        print(f"would run {len(checks)} checks, {args.budget:.0f} s budget in all, each in its own process group:")
        for name, timeout_s in checks:
            print(f"  {name:15s} timeout {timeout_s:3d} s  {CHECKS[name][1]}")
            print(f"  {'':15s} $ {' '.join(child_command(name, workdir, smoke=args.smoke))}")
        return 0
    out = os.environ.get("OUT")
    summary_path = Path(args.json) if args.json else (Path(out) / "device_check.json" if out else None)
    skipped = preflight(args.smoke)
    if skipped:
        outcomes = [Outcome(name, "SKIP", skipped) for name, _ in checks]
        for outcome in outcomes:
            print(outcome.line(), flush=True)
    else:
        outcomes = run_all(checks, workdir, smoke=args.smoke, budget_s=args.budget,
                           log_dir=summary_path.parent if summary_path else None)
    failed = [o.name for o in outcomes if o.status == "FAIL"]
    if summary_path is not None:
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps({"environment": environment(), "passed": not failed,
                                            "checks": [asdict(o) for o in outcomes]}, indent=2))
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} checks did not fail"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
