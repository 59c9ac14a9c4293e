"""The flags of multi-turn agent rollouts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.tasks.environment import ENVIRONMENTS
from parallel.options import option

DEFAULT_MAX_TURNS = 8
DEFAULT_STEP_TIMEOUT_S = 60.0


@dataclass(kw_only=True)
class AgentConfig:
    """Multi-turn rollouts: an environment answers each of the model's turns. A trajectory (prompt, every
    turn, every environment reply) holds at most --max_len tokens; --generate_max_len caps each turn."""

    agent_func_path: str | None = option(None, help="a Python file with an OpenRLHF-protocol AgentInstance "
                                                     "(async reset / step): multi-turn rollouts")
    agent_task: str | None = option(None, help="a built-in environment for multi-turn rollouts: calculator_tool, "
                                               "guess_number")
    max_turns: int | None = option(None, help=f"model turns per trajectory (default {DEFAULT_MAX_TURNS})")
    agent_step_timeout: float | None = option(None, help="seconds an environment's reset / step may take; past it the "
                                                         f"trajectory fails (default {DEFAULT_STEP_TIMEOUT_S:.0f})")
    agent_fail_fast: bool = option(False, help="an environment step that raises or times out stops the run (default: "
                                               "that trajectory gets reward 0 and is counted)")
    turn_rewards: Literal["sum", "per_turn"] = option(
        "sum", help="sum: a trajectory's reward is the sum of its turns' rewards, on its last token (what the "
                    "group estimators need); per_turn: each turn's reward on that turn's last token, so "
                    "--gamma discounts later turns and GAE credits each turn (gae / reinforce only)")

    def __post_init__(self) -> None:
        if self.agent_func_path and self.agent_task:
            raise ValueError("--agent_func_path and --agent_task both name an environment: pass one")
        if self.agent_task is not None and self.agent_task not in ENVIRONMENTS:
            raise ValueError(f"--agent_task {self.agent_task!r} is not known; known: " + ", ".join(sorted(ENVIRONMENTS)))
        if not self.enabled:
            given = [flag for flag, value in (("--max_turns", self.max_turns),
                                              ("--agent_step_timeout", self.agent_step_timeout),
                                              ("--agent_fail_fast", self.agent_fail_fast or None),
                                              ("--turn_rewards", None if self.turn_rewards == "sum" else self.turn_rewards))
                     if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} need multi-turn rollouts: pass --agent_func_path or --agent_task")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"--max_turns must be >= 1, got {self.max_turns}")
        if self.agent_step_timeout is not None and self.agent_step_timeout <= 0:
            raise ValueError(f"--agent_step_timeout must be > 0 seconds, got {self.agent_step_timeout}")

    @property
    def enabled(self) -> bool:
        return bool(self.agent_func_path or self.agent_task)

    @property
    def turns(self) -> int:
        return self.max_turns if self.max_turns is not None else DEFAULT_MAX_TURNS

    @property
    def step_timeout_s(self) -> float:
        return self.agent_step_timeout if self.agent_step_timeout is not None else DEFAULT_STEP_TIMEOUT_S
