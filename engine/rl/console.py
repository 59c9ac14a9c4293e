"""What a person watching an RL run sees: one progress bar over the rollouts with one metrics line
per rollout written above it, and a run directory holding the metrics of every rollout
(``metrics.jsonl``), a plot of the reward per rollout (``reward.png``, eval reward too) and the
engines' and role workers' logs (``ray_logs``), which reach the console only with ``--verbose``."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from parallel.options import option


@dataclass(kw_only=True)
class ConsoleConfig:
    run_dir: str | None = option(None, help="where the run's metrics.jsonl, reward.png and ray_logs go "
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

    def plot(self, history: list[dict]) -> Path:
        path = self.run_dir / "reward.png"
        series = {"reward": [(h["step"], h["reward"]) for h in history if "reward" in h],
                  "eval/reward": [(h["step"], h["eval/reward"]) for h in history if "eval/reward" in h]}
        plot_series(series, path, title="reward per rollout")
        return path


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


COLOURS = {"reward": (31, 119, 180), "eval/reward": (255, 127, 14)}


def plot_series(series: dict[str, list[tuple[float, float]]], path: Path, *, title: str,
                size: tuple[int, int] = (640, 400)) -> None:
    """A line chart (PIL only: no plotting library needed on a cluster node)."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values]
    if not points:
        draw.text((left, top), f"{title}: no data", fill="black")
        image.save(path)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)
    y_lo, y_hi = min(ys), max(ys)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, 8), title, fill="black")
    for value, label_y in ((y_lo, height - bottom), (y_hi, top)):
        draw.text((4, label_y - 6), f"{value:.3g}", fill="black")
    draw.text((left, height - bottom + 6), f"rollout {x_lo:g}", fill="black")
    draw.text((width - right - 90, height - bottom + 6), f"rollout {x_hi:g}", fill="black")
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS.get(name, (44, 160, 44))
        pixels = [at(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((width - right - 120, top + 6 + 14 * i), name, fill=colour)
    image.save(path)
