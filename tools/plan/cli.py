"""Which layout fits a cluster, and how long a step takes: the capacity planner.

    python -m tools.plan --model llama3-70b --job ppo --nodes 4 --gpus_per_node 8 \\
        --tensor_model_parallel_size 8 --pipeline_model_parallel_size 4      # check one layout
    python -m tools.plan --model mixtral-8x7b --job sft --nodes 2                # search layouts
    python -m tools.plan --from_checkpoint CKPT --nodes 2 --gpus_per_node 8       # where CKPT resumes

Memory per rank of every pipeline stage (weights, gradients, optimizer shards, activations,
logits; vLLM weights + KV cache for ppo / grpo) and an estimated step time; without a complete
layout, every layout that fits, fastest first. ``--json`` prints one JSON object. With
``--from_checkpoint`` the model and job are the checkpoint's (``tools.plan.from_checkpoint``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

from engine.cli.options import group, parse_job, run_cli
from tools.plan.configs import load_hf_config
from tools.plan.spec import ClusterSpec, LayoutSpec, ModelSpec, OutputSpec, RolloutSpec


@dataclass(kw_only=True)
class PlanJob:
    model: ModelSpec = group(title="model and job", factory=ModelSpec)
    cluster: ClusterSpec = group(title="cluster", factory=ClusterSpec)
    layout: LayoutSpec = group(title="layout and batch", factory=LayoutSpec)
    rollout: RolloutSpec = group(title="ppo / grpo", factory=RolloutSpec)
    output: OutputSpec = group(title="output", factory=OutputSpec)


def parse_args(argv=None) -> PlanJob:
    return parse_job(PlanJob, argv, description=__doc__)


def adapters(job: PlanJob):
    from models.registry import get_adapter

    adapter = get_adapter(load_hf_config(job.model.model))
    reward = job.model.reward_pretrain or (job.model.model if job.model.job == "ppo" else None)
    return adapter, (get_adapter(load_hf_config(reward)) if reward else None)


def assumptions(job: PlanJob) -> dict:
    c = job.cluster
    return {"mfu": c.mfu, "gpu_tflops": c.gpu_tflops, "reserved_memory_gb": c.reserved_memory_gb,
            "bf16": job.model.bf16}


def resolve(job: PlanJob) -> tuple[PlanJob, dict | None]:
    """The job with its model and job kind filled in (from --from_checkpoint, or the defaults), and
    what the checkpoint told (None without one)."""
    if job.model.from_checkpoint:
        from tools.plan.from_checkpoint import read_checkpoint

        info = read_checkpoint(job.model.from_checkpoint, job=job.model.job)
        # The resolved spec names the checkpoint's hf/ as its model (what "checkpoint" says came from where).
        return replace(job, model=replace(job.model, model=info["hf_dir"], job=info["job"], from_checkpoint=None)), info
    return replace(job, model=replace(job.model, model=job.model.model or "llama3-70b",
                                      job=job.model.job or "sft")), None


def run(job: PlanJob) -> dict | list:
    """The plan (a complete layout) or the ranked search, as printed."""
    # The planner builds the model on the meta device (torch, megatron): imported when it runs, not
    # when --help is printed.
    from tools.plan.plan import layout_of, make_plan
    from tools.plan.report import format_plan, format_search, plan_dict
    from tools.plan.search import is_complete, search

    job, checkpoint = resolve(job)
    adapter, reward = adapters(job)
    said = assumptions(job)
    if is_complete(job.layout, adapter):
        plan = make_plan(job.model, job.cluster, layout_of(job.layout, bool(adapter.num_experts)), job.layout,
                         job.rollout, adapter, reward)
        if job.output.json:
            return {**plan_dict(plan, assumptions=said, checkpoint=checkpoint), **_checkpoint_part(checkpoint)}
        return _with_checkpoint(format_plan(plan, assumptions=said), checkpoint)
    plans, tried = search(job.model, job.cluster, job.layout, job.rollout, adapter, reward)
    if job.output.json:
        return {"tried": tried, "plans": [plan_dict(p, assumptions=said, checkpoint=checkpoint)
                                          for p in plans[:job.output.top]],
                "request": asdict(job), **_checkpoint_part(checkpoint)}
    return _with_checkpoint(format_search(plans, tried, top=job.output.top, assumptions=said, checkpoint=checkpoint),
                            checkpoint)


def _checkpoint_part(checkpoint: dict | None) -> dict:
    return {"checkpoint": checkpoint} if checkpoint is not None else {}


def _with_checkpoint(text: str, checkpoint: dict | None) -> str:
    if checkpoint is None:
        return text
    from tools.plan.from_checkpoint import describe

    return describe(checkpoint) + "\n\n" + text


def main(argv=None) -> None:
    job = parse_args(argv)
    result = run(job)
    print(json.dumps(result, indent=1) if job.output.json else result)


if __name__ == "__main__":
    run_cli(main)
