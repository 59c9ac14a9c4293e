"""The mismatch doctor: does a vLLM engine holding a checkpoint's synced weights compute, layer by
layer, what the Megatron actor computes? (docs/jobs.md, "When rollout_logprob_abs_diff rises")

    python -m tools.doctor --actor_ckpt CKPT --prompts prompts.jsonl --input_key prompt \\
        [--actor_num_gpus_per_node 4 --actor_tensor_model_parallel_size 2 --actor_pipeline_model_parallel_size 2] \\
        [--vllm_tensor_parallel_size 2] [--run_dir DIR]

Starts a local Ray cluster (or joins RAY_ADDRESS), the actor's Megatron ranks from --actor_ckpt (an
HF directory or a Megatron checkpoint) and one vLLM engine from its config; pushes the actor's
weights into the engine through the RL job's weight sync; lets the engine answer the first
--doctor_samples prompts greedily (--generate_max_len tokens); runs each prompt + answer through
both and prints the per-layer table; the JSON report goes to <run_dir>/doctor/step_0.json.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from engine.cli.options import group, naming_flags, parse_job, run_cli
from engine.cli.train_ppo_ray import RoleOptions, role_group
from engine.data.config import DataConfig
from engine.ray.config import VLLMEngineConfig, WeightSyncConfig
from engine.rl.config import DoctorConfig
from parallel.options import option


@dataclass(kw_only=True)
class DoctorRun:
    """What the doctor compares, and where the report goes."""

    actor_ckpt: str = option(help="the actor: HF directory or Megatron checkpoint (the engine starts from its config)")
    generate_max_len: int = option(16, help="tokens the engine answers each prompt with (greedy); the doctor runs "
                                            "prompt + answer")
    run_dir: str | None = option(None, help="where doctor/step_0.json goes (default: runs/doctor/<date-time>)")
    verbose: bool = option(False, help="vLLM's, Ray's and the workers' logs on the console too")
    seed: int = option(42, help="random seed")

    def __post_init__(self) -> None:
        if self.generate_max_len < 1:
            raise ValueError(f"--generate_max_len must be positive, got {self.generate_max_len}")

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / "doctor" / time.strftime("%Y%m%d-%H%M%S")


@dataclass(kw_only=True)
class DoctorJob:
    run: DoctorRun = group(title="doctor")
    doctor: DoctorConfig = group(title="doctor", exclude=("doctor_every",), factory=DoctorConfig)
    actor: RoleOptions = role_group("actor")
    # Eager always: a compiled forward (torch.compile / CUDA graphs) runs no module hooks.
    vllm: VLLMEngineConfig = group(title="vLLM engine", exclude=("num_engines", "enable_sleep_mode", "enforce_eager",
                                                                 "enable_prefix_caching", "max_num_seqs"),
                                   factory=VLLMEngineConfig)
    sync: WeightSyncConfig = group(title="vLLM engine", factory=WeightSyncConfig)
    data: DataConfig = group(title="prompts", rename={"dataset": "prompts"},
                             exclude=("dataset_probs", "output_key", "label_key", "chosen_key", "rejected_key",
                                      "prompt_key", "eval_split", "pretrain_mode", "packing_samples", "multiturn",
                                      "max_len", "max_samples", "skip_bad_rows"))

    derived: ClassVar[dict[str, str]] = {"vllm.pretrain": "run.actor_ckpt", "vllm.seed": "run.seed",
                                         "data.seed": "run.seed"}


def parse_args(argv=None) -> DoctorJob:
    return parse_job(DoctorJob, argv, description=__doc__)


def _actor_config(job: DoctorJob):
    """The actor role, frozen (the doctor only runs forwards), on the --actor_* grid."""
    from engine.ray.role_worker import RoleConfig
    from engine.runtime.engine import EngineConfig
    from models.sources import ModelSource

    with naming_flags(DoctorJob, "actor"):
        source = ModelSource.open(job.run.actor_ckpt, flag="--actor_ckpt")
        source.check_role(value_head=False, trainable=False)
        adapter = source.adapter()
        job.actor.parallel.validate_model(
            num_layers=adapter.num_layers, num_attention_heads=adapter.attention.num_heads,
            num_query_groups=adapter.attention.num_kv_heads, num_experts=adapter.num_experts)
        return source, RoleConfig(name="actor", num_ranks=job.actor.num_ranks, engine=EngineConfig(
            pretrain=job.run.actor_ckpt, pretrain_flag="--actor_ckpt", seed=job.run.seed,
            parallel=job.actor.parallel))


def _prompt_ids(job: DoctorJob, tokenizer) -> list[list[int]]:
    from engine.data.prompts import PromptDataset

    prompts = PromptDataset.from_config(job.data, tokenizer)
    if len(prompts) == 0:
        raise ValueError(f"--prompts {job.data.dataset} has no usable prompts")
    return [list(prompts[i]["prompt_ids"]) for i in range(min(job.doctor.doctor_samples, len(prompts)))]


def start_actor_and_engine(actor_config, engine_config, *, start_engines) -> tuple:
    """The actor's ranks and the engine pool (``start_engines(engine_config)``), started side by side
    (each spends its start-up importing and loading; neither needs the other); on a failure of
    either, the other is shut down."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.ray.role_group import RoleGroup

    with ThreadPoolExecutor(max_workers=1) as thread:
        starting = thread.submit(start_engines, engine_config)
        actor = failure = None
        try:
            actor = RoleGroup(actor_config)
        except BaseException as err:  # noqa: BLE001 - raised below, once the engines are stopped
            failure = err
        try:
            pool = starting.result()
        except BaseException:
            if actor is not None:
                actor.shutdown()
            raise
    if failure is not None:
        pool.shutdown()
        raise failure
    return actor, pool


def diagnose(job: DoctorJob) -> dict:
    """Start the actor and one engine, sync, answer, compare; everything is shut down after."""
    from engine.ray.cluster import join_cluster
    from engine.ray.doctor import RayDoctor
    from engine.ray.vllm_engine import engines_on_gpus, start_pool
    from engine.ray.weight_sync import ActorWeightSync, resolve_sync_backend
    from engine.rl.rollout import SamplingConfig

    source, actor_config = _actor_config(job)
    tokenizer = source.tokenizer()
    prompt_ids = _prompt_ids(job, tokenizer)
    join_cluster(log_to_driver=job.run.verbose)
    engine_config = replace(job.vllm, weights_from_trainer=True, enforce_eager=True,
                            # + 1: the doctor's probe of a full-length answer samples one more token
                            max_model_len=max(map(len, prompt_ids)) + job.run.generate_max_len + 1)
    actor, pool = start_actor_and_engine(actor_config, engine_config, start_engines=start_pool)
    try:
        transport = resolve_sync_backend(job.sync.backend, cuda=engines_on_gpus(engine_config), colocated=False)
        ActorWeightSync(actor, pool, job.sync, backend=transport).push()
        stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
        samples = pool.generate(prompt_ids, SamplingConfig(temperature=0.0, max_new_tokens=job.run.generate_max_len,
                                                           stop_token_ids=stop, seed=job.run.seed))
        sequences = [prompt_ids[s.prompt_index] + list(s.response_token_ids) for s in samples]
        doctor = RayDoctor(job.doctor, actor=actor, engines=pool, run_dir=job.run.resolved_run_dir().resolve())
        return doctor.report(0, sequences)
    finally:
        pool.shutdown()
        actor.shutdown()


def main(argv=None) -> dict:
    return diagnose(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
