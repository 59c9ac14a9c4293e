"""The run directory's plots: what the legend says is what is drawn."""
from __future__ import annotations

from PIL import Image


def _history(with_eval: bool) -> list[dict]:
    rows = [{"step": s, "reward": 0.1 * s, "response_length": 10 + s, "rollout_logprob_abs_diff": 1e-7 * s}
            for s in range(1, 7)]
    if with_eval:
        rows[2]["eval/reward"], rows[5]["eval/reward"] = 0.4, 0.7
    return rows


def test_reward_plot_legend_names_only_the_series_drawn(tmp_path):
    from engine.rl.plots import plot_rewards

    assert plot_rewards(_history(with_eval=False), tmp_path / "a.png") == ["reward"]
    assert plot_rewards(_history(with_eval=True), tmp_path / "b.png") == ["reward", "eval reward"]
    assert plot_rewards([], tmp_path / "c.png") == []
    assert Image.open(tmp_path / "b.png").size == (640, 400)


def test_run_record_writes_both_plots(tmp_path):
    from engine.rl.console import RunRecord

    RunRecord(tmp_path).plot(_history(with_eval=True))
    assert Image.open(tmp_path / "reward.png").size == (640, 400)
    assert Image.open(tmp_path / "rollout.png").size == (960, 400)
