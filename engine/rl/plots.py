"""The run directory's plots of an RL run (matplotlib, drawn off-screen with the Agg backend).

``reward.png``: the reward per rollout and, when the run evaluates, the eval reward; the legend
lists exactly the series drawn. ``rollout.png``: the mean response length and the train-vs-engine
log-prob gap (``rollout_logprob_abs_diff``, the engines' mismatch with the trainer) per rollout.
"""
from __future__ import annotations

from pathlib import Path

SIZE_INCHES, DPI = (6.4, 4.0), 100  # 640 x 400 pixels


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(h["step"], h[key]) for h in history if key in h and h[key] == h[key]]  # NaN-free
    return [p[0] for p in points], [p[1] for p in points]


def _axes(ax, *, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("rollout")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


REWARD_SERIES = (("reward", "reward", "o-"), ("eval/reward", "eval reward", "s--"))


def plot_rewards(history: list[dict], path: Path) -> list[str]:
    """Reward (and eval reward) per rollout; returns the legend's labels (the series drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, ax = plt.subplots(figsize=SIZE_INCHES, dpi=DPI)
    for key, label, style in REWARD_SERIES:
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, style, markersize=3, label=label)
    _axes(ax, title="reward per rollout", ylabel="mean reward")
    labels = ax.get_legend_handles_labels()[1]
    if labels:
        ax.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return labels


def plot_rollout_shape(history: list[dict], path: Path) -> Path:
    """Response length and the train-vs-engine log-prob gap per rollout, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (length_ax, gap_ax) = plt.subplots(1, 2, figsize=(SIZE_INCHES[0] * 1.5, SIZE_INCHES[1]), dpi=DPI)
    steps, values = _series(history, "response_length")
    length_ax.plot(steps, values, "o-", markersize=3)
    _axes(length_ax, title="response length", ylabel="tokens (mean)")
    steps, values = _series(history, "rollout_logprob_abs_diff")
    gap_ax.plot(steps, values, "o-", markersize=3, color="tab:red")
    if values and min(values) > 0:
        gap_ax.set_yscale("log")
    _axes(gap_ax, title="train vs engine log-prob gap", ylabel="mean |logp_actor - logp_engine|")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
