"""--max_engine_restarts: a rollout engine that dies or stops answering is replaced and the run goes on.

The bookkeeping (the restart budget, the flags) without engines; the pool's retry of the shares a
dead or hung engine had not returned on stand-in Ray actors; and a GRPO run on two vLLM engines one
of which is SIGKILLed in the middle of a rollout, against the same run where nothing died.
"""
from __future__ import annotations

import itertools
import os
import signal
import time

import pytest

from engine.ray.engine_pool import EngineError, EngineFailure
from engine.ray.engine_restarts import RestartBudget
from tests.rl_harness import ppo_args

# Every character of a response counts: equal rewards of a rollout mean (all but surely) equal samples.
REWARD_FUNC = '''
def reward_func(prompts, responses, labels):
    return [(sum(map(ord, r)) % 97) / 97 for r in responses]
'''
KILLED_ROLLOUT = 2
# The pool's deadline on the stand-ins: the hung one costs it once (the others answer in milliseconds, and
# a SIGKILLed one is found dead by Ray within about a second).
HANG_DEADLINE_S = 5


# ----- the bookkeeping ---------------------------------------------------------------------------

def test_the_budget_counts_each_rollouts_restarts_and_ends_the_run_naming_every_cause():
    budget = RestartBudget(2)
    assert budget.drain_metrics() == {"engine/restarts": 0.0, "engine/requests_retried": 0.0}
    budget.spend([EngineFailure(1, "vLLM engine 1", "died during generate: killed", requests=8)], when="while generating")
    budget.spend([], when="at the health check")  # nothing failed: nothing spent
    assert budget.drain_metrics() == {"engine/restarts": 1.0, "engine/requests_retried": 8.0}
    assert budget.drain_metrics() == {"engine/restarts": 0.0, "engine/requests_retried": 0.0}  # per rollout
    two = [EngineFailure(0, "vLLM engine 0", "did not answer within 60 s"), EngineFailure(1, "vLLM engine 1", "is dead")]
    with pytest.raises(EngineError, match=r"vLLM engine 0 did not answer within 60 s; vLLM engine 1 is dead \(at the "
                                          r"health check\); --max_engine_restarts 2 does not cover 2 more \(1 restart\(s\) "
                                          r"already: vLLM engine 1 died during generate: killed \(while generating\)\)"):
        budget.spend(two, when="at the health check")
    assert budget.restarts == 1  # a refused spend takes nothing
    budget.spend(two[:1], when="at the health check")
    assert budget.restarts == 2 and budget.drain_metrics()["engine/restarts"] == 1.0


def test_restart_flags_are_checked():
    from engine.cli import train_ppo_ray
    from engine.cli.options import OptionError
    from engine.ray.config import EngineRestartConfig

    base = ["--pretrain", "m", "--prompt_data", "p"]
    job = train_ppo_ray.parse_args(base + ["--max_engine_restarts", "2", "--engine_generate_timeout_s", "30"])
    assert job.engine_restarts == EngineRestartConfig(max_engine_restarts=2, engine_generate_timeout_s=30.0)
    assert job.engine_restarts.health_timeout_s == 60.0
    for flags, message in ((["--max_engine_restarts", "-1"], "--max_engine_restarts must be >= 0"),
                           (["--engine_health_timeout_s", "5"], "--engine_health_timeout_s needs --max_engine_restarts"),
                           (["--engine_generate_timeout_s", "0"], "--engine_generate_timeout_s must be > 0")):
        with pytest.raises(OptionError, match=message):
            train_ppo_ray.parse_args(base + flags)


def test_a_pool_that_cannot_replace_engines_or_sleeping_engines_refuse_the_flag():
    from engine.ray.config import EngineRestartConfig
    from engine.ray.engine_pool import RayEnginePool
    from engine.ray.rollouts import EngineRollouts

    restarts = EngineRestartConfig(max_engine_restarts=1)
    with pytest.raises(ValueError, match="--max_engine_restarts: this rollout backend's engines cannot be replaced"):
        EngineRollouts(RayEnginePool([]), None, restarts=restarts)
    with pytest.raises(ValueError, match="--max_engine_restarts with --vllm_enable_sleep"):
        EngineRollouts(RayEnginePool([], start_engine=lambda i: None), None, sleep=True, restarts=restarts)


# ----- the pool's retry, on stand-in engines (the bookkeeping is the driver's) ----------------------

def _stub_class(ray):
    @ray.remote(num_cpus=0)
    class StubEngine:
        """Answers each prompt with samples made of its seed: what a seeded engine returns."""

        def __init__(self, hang: bool = False):
            self.hang = hang

        def generate(self, prompt_token_ids, sampling, prompt_index_offset=0):
            from engine.rl.rollout import RolloutSample

            if self.hang:
                time.sleep(300)
            n = sampling.n_samples_per_prompt
            return [RolloutSample(prompt_index=prompt_index_offset + i, sample_index=j, logprobs=None,
                                  response_token_ids=[sampling.seed + (prompt_index_offset + i) * n + j, *ids],
                                  finish_reason="stop")
                    for i, ids in enumerate(prompt_token_ids) for j in range(n)]

        def ready(self):
            return True

        def pid(self):
            return os.getpid()

    return StubEngine


def _wait_until_dead(ray, handle, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.ready.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.2)
    raise AssertionError(f"a killed engine still answers after {timeout_s:.0f} s")


def test_the_shares_of_a_dead_and_a_hung_engine_are_generated_again_on_their_replacements(ray_cluster):
    from engine.ray.engine_pool import RayEnginePool
    from engine.rl.rollout import SamplingConfig

    ray = ray_cluster
    stub = _stub_class(ray)
    prompts, sampling = [[i, i + 1] for i in range(7)], SamplingConfig(n_samples_per_prompt=2, seed=5)
    expected = RayEnginePool([stub.remote()]).generate(prompts, sampling)

    def started(engine):  # as a backend's start_engine: returns once the engine is up
        ray.get(engine.ready.remote(), timeout=120)
        return engine

    # The deadline must not be met by a stand-in's start-up on a loaded box: each is up before it counts.
    pool = RayEnginePool([started(stub.remote()), started(stub.remote()), started(stub.remote(hang=True))],
                         generate_timeout_s=HANG_DEADLINE_S, start_engine=lambda i: started(stub.remote()))
    recovered = []

    def recovery(failures):  # here replacing is all; EngineRollouts also re-forms the sync groups and pushes
        recovered.append(failures)
        for failure in failures:
            pool.replace_engine(failure.index)

    pool.recovery = recovery
    os.kill(ray.get(pool.handles[1].pid.remote(), timeout=60), signal.SIGKILL)
    old = list(pool.handles)
    assert pool.submit_generate(prompts, sampling).result() == expected
    [failures] = recovered  # one round: both failures found under the one deadline
    assert [(f.index, f.requests) for f in failures] == [(1, 2), (2, 2)]  # shares [3, 5) and [5, 7) of 7 prompts
    assert failures[0].reason.startswith("died during generate")
    assert failures[1].reason == f"did not finish generate within {HANG_DEADLINE_S} s"
    assert pool.handles[0] is old[0] and pool.handles[1] is not old[1] and pool.handles[2] is not old[2]
    ray.get([h.ready.remote() for h in pool.handles], timeout=60)  # the replacements answer
    pool.recovery = None  # without recovery (--max_engine_restarts 0) the first failure ends the generation
    ray.kill(pool.handles[0])
    _wait_until_dead(ray, pool.handles[0])  # ray.kill is asynchronous: a call right after it may still run
    with pytest.raises(EngineError, match="engine 0 died during generate"):
        pool.submit_generate(prompts, sampling).result()
    for handle in pool.handles:
        ray.kill(handle)


# ----- a GRPO run on two vLLM engines, one SIGKILLed while generating -------------------------------

@pytest.fixture(scope="module")
def base_setup(tmp_path_factory):
    """The tiny demo model as it is (no SFT: nothing here needs the reward to rise) and the addition prompts."""
    from engine.cli import demo

    root = tmp_path_factory.mktemp("restarts")
    model, data = demo.prepare(root)
    reward = root / "char_sum.py"
    reward.write_text(REWARD_FUNC)
    return {"model": model, "prompts": f"json@{data}", "reward": str(reward), "root": root}


def test_engines_killed_between_and_in_the_middle_of_rollouts_are_replaced_and_the_run_equals_one_where_nothing_died(
        base_setup, ray_cluster, monkeypatch):
    """Engine 0's process gets SIGKILL after rollout 1 (found by the health call before the weight sync),
    engine 1's right after rollout 2's prompts were handed to the engines (found while generating):
    each is replaced on its placement and takes the actor's weights, and engine 1's 8 prompts are
    generated again with their seeds. The run finishes, and every rollout's samples (rewards, lengths)
    and losses equal the run where nothing died; the replacements hold the actor's weights after every
    later sync (fp32: equal log-probs)."""
    import ray

    from engine.cli import train_ppo_ray
    from engine.ray.engine_pool import RayEnginePool

    grpo = ("--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "3", "--vllm_num_engines", "2")
    submit, health = RayEnginePool.submit_generate, RayEnginePool.health
    submits, healths, pids = itertools.count(1), itertools.count(1), {}

    def pid(pool, index: int) -> int:
        return ray.get(pool.handles[index].pid.remote(), timeout=60)

    # The moments of the kills: the pool's calls wrapped (the pool, the engines and the loop are the real ones).
    def submit_then_kill(pool, prompt_token_ids, sampling):
        call = next(submits)
        pids[("submit", call)] = (pid(pool, 0), pid(pool, 1))
        pending = submit(pool, prompt_token_ids, sampling)  # each engine has its share of the rollout
        if call == KILLED_ROLLOUT:
            os.kill(pids[("submit", call)][1], signal.SIGKILL)
        return pending

    def kill_then_health(pool, **kwargs):
        if next(healths) == 1:  # the weight sync after rollout 1
            pids["health"] = pid(pool, 0)
            os.kill(pids["health"], signal.SIGKILL)
        return health(pool, **kwargs)

    started = time.monotonic()
    monkeypatch.setattr(RayEnginePool, "submit_generate", submit_then_kill)
    monkeypatch.setattr(RayEnginePool, "health", kill_then_health)
    history = train_ppo_ray.main(ppo_args(base_setup, *grpo, "--max_engine_restarts", "2"))
    monkeypatch.undo()
    restarted_in = time.monotonic() - started
    reference = train_ppo_ray.main(ppo_args(base_setup, *grpo))

    assert [h["step"] for h in history] == [1, 2, 3]
    assert [h["engine/restarts"] for h in history] == [1, 1, 0]
    assert [h["engine/requests_retried"] for h in history] == [0, 8, 0]  # engine 1's half of 16 prompts
    first, second, third = (pids[("submit", call)] for call in (1, 2, 3))
    assert first[0] == pids["health"] != second[0] == third[0]  # engine 0: a new process from rollout 2 on
    assert first[1] == second[1] != third[1]  # engine 1: from rollout 3 on
    for killed in (pids["health"], second[1]):
        with pytest.raises(ProcessLookupError):
            os.kill(killed, 0)
    for key in ("reward", "response_length", "actor/policy_loss", "actor/grad_norm"):
        assert [h[key] for h in history] == [h[key] for h in reference], key
    assert len({h["reward"] for h in history}) > 1  # rewards that tell samples apart
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert all("engine/restarts" not in h for h in reference)  # the flag's metrics only with the flag
    print(f"run with two restarts: {restarted_in:.0f} s")
