"""Multi-turn agent rollouts: trajectories per second of the concurrent executor vs a sequential
turn loop, over the same vLLM engine and the same environment (a tool with a simulated latency).

    python -m tools.bench.bench_agent_rollout            # workload W's model (DESIGN.md)
    python -m tools.bench.bench_agent_rollout --quick    # a small model, for a smoke run

Each trajectory is ``--turns`` model turns of ``--turn_tokens`` tokens (forced to that length),
each followed by a tool step that sleeps ``--tool_latency_ms`` and replies with a few tokens.
Concurrent: every trajectory in flight at once (``engine.rl.agents``: environment steps awaited
while the other trajectories' turns generate, turns batched onto the engine). Sequential: the
same executor handed one trajectory at a time (turn, tool, turn, ...), the loop a framework
without an agent executor runs. Both in the same run, one engine, fp32; on a shared box the
numbers move with the load (printed).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from tools.bench.common import print_table, reference_model


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small model, 16 trajectories")
    parser.add_argument("--num_trajectories", type=int, default=32)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn_tokens", type=int, default=16)
    parser.add_argument("--tool_latency_ms", type=float, default=50.0)
    args = parser.parse_args()
    if args.quick:
        args.num_trajectories = 16
    return args


def _environment(turns: int, latency_s: float):
    from engine.tasks.environment import Environment, Step

    class LatencyTool(Environment):
        async def reset(self, prompt, label):
            self.steps = 0

        async def step(self, action):
            self.steps += 1
            await asyncio.sleep(latency_s)  # the tool's round trip
            return Step(reward=1.0, done=self.steps == turns, text=" tool says 42\n")

    return LatencyTool


def _timed(executor, requests, sampling, pool, *, sequential: bool) -> tuple[float, int]:
    from engine.rl.agents.turns import PoolTurns

    async def run():
        turns = PoolTurns(pool)
        if not sequential:
            return await executor.run(requests, sampling, turns)
        return [s for request in requests for s in await executor.run([request], sampling, turns)]

    started = time.perf_counter()
    samples = asyncio.run(run())
    return time.perf_counter() - started, sum(int(s.info["turns"]) for s in samples)


def main() -> None:
    import ray

    from engine.ray.vllm_engine import VLLMEngineConfig, start_pool
    from engine.rl.agents.executor import AgentExecutor, AgentRequest
    from engine.rl.rollout import SamplingConfig
    from models.tiny import build_tokenizer

    args = _parse_args()
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        path = reference_model(tmp, quick=args.quick)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        pool = start_pool(VLLMEngineConfig(pretrain=path, dtype="float32", enforce_eager=True, max_model_len=1024))
        try:
            executor = AgentExecutor(make_environment=_environment(args.turns, args.tool_latency_ms / 1000),
                                     tokenizer=tokenizer, max_turns=args.turns, max_len=1024, step_timeout_s=60.0)
            requests = [AgentRequest(prompt_ids=tokenizer(f"task {i}:")["input_ids"], prompt=f"task {i}:")
                        for i in range(args.num_trajectories)]
            sampling = SamplingConfig(max_new_tokens=args.turn_tokens, min_new_tokens=args.turn_tokens,
                                      ignore_eos=True, temperature=1.0)
            _timed(executor, requests[:2], sampling, pool, sequential=False)  # warm-up
            rows = []
            for name, sequential in (("sequential turn loop", True), ("concurrent executor", False)):
                seconds, turns = _timed(executor, requests, sampling, pool, sequential=sequential)
                rows.append((name, seconds, args.num_trajectories / seconds, turns))
        finally:
            pool.shutdown()
            ray.shutdown()
    print_table(f"{args.num_trajectories} trajectories x {args.turns} turns x {args.turn_tokens} tokens, tool latency "
                f"{args.tool_latency_ms:g} ms, one vLLM engine (fp32), load {os.getloadavg()[0]:.1f}",
                ["loop", "seconds", "trajectories/s", "model turns"], rows)
    print(f"\nconcurrent / sequential: {rows[1][2] / rows[0][2]:.2f}x trajectories per second")


if __name__ == "__main__":
    main()
