"""What a person watching an RL run sees: one progress bar over the rollouts with one metrics line
per rollout written above it, and a run directory holding the metrics of every rollout
(``metrics.jsonl``), plots of the reward per rollout (``reward.png``, eval reward too) and of the
response length and the train-vs-engine gap (``rollout.png``, ``engine.rl.plots``), and the
engines' and role workers' logs (``ray_logs``), which reach the console only with ``--verbose``."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from engine.rl.plots import plot_rewards, plot_rollout_shape
from parallel.options import option


@dataclass(kw_only=True)
class ConsoleConfig:
    run_dir: str | None = option(None, help="where the run's metrics.jsonl, reward.png, rollout.png and ray_logs go "
                                            "(default: runs/ppo_ray/<date-time>, under ray job submit in the home "
                                            "directory: the job's working directory is Ray's temporary copy)")
    verbose: bool = option(False, help="vLLM's, Ray's and the role workers' logs on the console too (else only in "
                                       "<run_dir>/ray_logs)")

    def resolved_run_dir(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        root = Path("runs")
        if "working_dir_files" in Path.cwd().parts:
            # A `ray job submit` driver runs inside Ray's unpacked copy of the working directory,
            # which Ray replaces when it unpacks it again for the actors: write to the home directory.
            root = Path.home() / "runs"
        return root / "ppo_ray" / time.strftime("%Y%m%d-%H%M%S")


class RolloutProgress:
    """A tqdm bar over the rollouts; metric lines go above it, never through it."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="rollouts", unit="rollout", dynamic_ncols=True)

    def write(self, line: str) -> None:
        self.bar.write(line)

    def advance(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class RunRecord:
    """The run directory: every rollout's metrics as one JSON line, and the reward plot."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).resolve()  # absolute: the driver's working directory may change later
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def add(self, metrics: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}) + "\n")

    def resume_at(self, step: int) -> int:
        """A run resumed after rollout ``step``: drop the lines of later rollouts (the interrupted run
        logged them; the resumed one logs them again). Rewritten aside and renamed, never half
        written. Returns the number of lines dropped."""
        if not self.metrics_path.exists():
            return 0
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        # A line that does not parse is the torn last write of a killed run: dropped too.
        kept = [line for line in lines if (logged := _step_of(line)) is not None and logged <= step]
        if len(kept) < len(lines):
            staging = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
            staging.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept))
            os.replace(staging, self.metrics_path)
        return len(lines) - len(kept)

    def plot(self, history: list[dict]) -> None:
        """``reward.png`` and ``rollout.png`` of the run directory."""
        plot_rewards(history, self.run_dir / "reward.png")
        plot_rollout_shape(history, self.run_dir / "rollout.png")


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
