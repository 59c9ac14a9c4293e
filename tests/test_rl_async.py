"""--async_train's flag checks and the CPU thread split of the RL roles (issue 18); the loop itself
runs end to end in tests/test_ppo_e2e_variants.py (staleness 1, reward rises)."""
from __future__ import annotations

import pytest

BASE = ["--pretrain", "m", "--prompt_data", "p.jsonl", "--remote_rm_url", "r.py", "--async_train"]


@pytest.mark.parametrize("flag", ["--colocate_all_models", "--vllm_enable_sleep", "--megatron_enable_sleep"])
def test_async_train_is_refused_where_engines_and_trainers_take_turns(flag):
    from engine.cli import train_ppo_ray
    from engine.cli.options import OptionError

    with pytest.raises(OptionError, match=f"--async_train with {flag}"):
        train_ppo_ray.parse_args([*BASE, flag])
    assert train_ppo_ray.parse_args(BASE).ppo.async_train


def test_a_roles_ranks_split_their_nodes_cores():
    from engine.ray.cpu_threads import rank_threads, ranks_per_machine

    assert ranks_per_machine(["a", "b", "a", "a"]) == [3, 1, 3, 3]
    assert rank_threads(machine_cores=16, ranks_on_machine=3) == 5
    assert rank_threads(machine_cores=2, ranks_on_machine=1) == 2
    assert rank_threads(machine_cores=2, ranks_on_machine=4) == 1  # never zero

