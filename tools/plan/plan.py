"""One layout of one job on one cluster: memory per rank of every pipeline stage, and step time.

Roles by job: sft trains a policy; dpo / kto a policy next to a frozen reference (two sequences
per sample: chosen + rejected, or sample + KL sample); rm a value model on pairs; ppo an actor
and a critic with a frozen reference and reward model and vLLM engines; grpo an actor, a
reference (when ``--init_kl_coef`` > 0), an optional reward model and the engines. Every Megatron
role uses the layout given. Roles sharing devices (``device_groups``) add up; the trained ones
take turns, so the larger step's activations count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from models.adapter import ModelAdapter
from parallel.config import ParallelConfig
from tools.plan import meta
from tools.plan.memory import Activations, Grid, RoleState, Shape, activation_bytes, state_bytes
from tools.plan.spec import ClusterSpec, LayoutSpec, ModelSpec, RolloutSpec
from tools.plan.timing import Cluster, Work, decode_seconds, step_seconds

GB = 1e9
SEQUENCES_PER_SAMPLE = {"sft": 1, "dpo": 2, "kto": 2, "rm": 2, "ppo": 1, "grpo": 1}
VLLM_OVERHEAD_BYTES = 2 * GB  # CUDA graphs and activations of a vLLM engine beside weights and KV cache


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    sequence_parallel: bool
    recompute: str
    recompute_num_layers: int | None
    recompute_modules: tuple[str, ...]
    adam_offload: bool
    micro_batch: int
    first_stage_layers: int | None = None  # uneven pipeline split (--decoder_first_pipeline_num_layers)
    last_stage_layers: int | None = None

    def parallel(self, moe: bool) -> ParallelConfig:
        return ParallelConfig(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                              decoder_first_pipeline_num_layers=self.first_stage_layers,
                              decoder_last_pipeline_num_layers=self.last_stage_layers,
                              context_parallel_size=self.cp, expert_model_parallel_size=self.ep,
                              expert_tensor_parallel_size=self.etp if moe else None,
                              sequence_parallel=self.sequence_parallel)

    def label(self) -> str:
        ends = (("first", self.first_stage_layers), ("last", self.last_stage_layers))
        uneven = ",".join(f"{end}={n}" for end, n in ends if n is not None)  # an uneven split: PP16(first=3,last=2)
        parts = [f"TP{self.tp}", f"PP{self.pp}" + (f"({uneven})" if uneven else ""), f"CP{self.cp}"]
        parts += [f"EP{self.ep}"] if self.ep > 1 else []
        extras = (["SP"] if self.sequence_parallel else []) + ([f"recompute={self.recompute}"]
                                                              if self.recompute != "none" else [])
        return " ".join(parts + extras + (["adam_offload"] if self.adam_offload else []))


@dataclass
class Role:
    name: str
    adapter: ModelAdapter
    trainable: bool
    value_head: bool
    offloaded: bool = False  # frozen weights wait in host memory between uses


@dataclass
class Plan:
    job: str
    layout: Layout
    world_size: int
    training_gpus: int
    data_parallel_size: int
    stages: list[dict] = field(default_factory=list)
    vllm: dict | None = None
    seconds: dict = field(default_factory=dict)
    fits: bool = True
    reasons: list[str] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)  # roles sharing devices, and how many GPUs they have

    @property
    def peak_bytes(self) -> int:
        """The fullest training GPU (engines of their own take --vllm_gpu_memory_utilization by design)."""
        return max((s["total_bytes"] for s in self.stages), default=0)

    @property
    def step_seconds(self) -> float:
        return sum(self.seconds.values())


def roles_of(model: ModelSpec, rollout: RolloutSpec, adapter: ModelAdapter, reward_adapter) -> list[Role]:
    job = model.job
    if job == "sft":
        return [Role("policy", adapter, True, False)]
    if job in ("dpo", "kto"):
        return [Role("policy", adapter, True, False), Role("reference", adapter, False, False)]
    if job == "rm":
        return [Role("reward", adapter, True, True)]
    roles = [Role("actor", adapter, True, False)]
    if job == "ppo":
        roles.append(Role("critic", adapter, True, True))
    if rollout.init_kl_coef > 0:
        roles.append(Role("reference", adapter, False, False, offloaded=rollout.ref_reward_offload))
    if reward_adapter is not None:
        roles.append(Role("reward", reward_adapter, False, True, offloaded=rollout.ref_reward_offload))
    return roles


def layout_of(spec: LayoutSpec, moe: bool) -> Layout:
    tp = spec.tensor_model_parallel_size or 1
    ep = spec.expert_model_parallel_size or 1
    etp = spec.expert_tensor_parallel_size or (1 if ep > 1 else tp)
    recompute = spec.recompute_granularity or "none"
    return Layout(tp=tp, pp=spec.pipeline_model_parallel_size or 1, cp=spec.context_parallel_size or 1, ep=ep,
                  etp=etp if moe else tp, sequence_parallel=tp > 1 if spec.sequence_parallel is None
                  else spec.sequence_parallel, recompute=recompute, recompute_num_layers=spec.recompute_num_layers,
                  recompute_modules=spec.modules, adam_offload=spec.adam_offload,
                  micro_batch=spec.micro_train_batch_size, first_stage_layers=spec.decoder_first_pipeline_num_layers,
                  last_stage_layers=spec.decoder_last_pipeline_num_layers)


def cluster_of(spec: ClusterSpec) -> Cluster:
    return Cluster(nodes=spec.nodes, gpus_per_node=spec.gpus_per_node, gpu_memory_gb=spec.gpu_memory_gb,
                   gpu_tflops=spec.gpu_tflops, mfu=spec.mfu, intra_node_gbps=spec.intra_node_bandwidth_gbps,
                   inter_node_gbps=spec.inter_node_bandwidth_gbps, hbm_gbps=spec.hbm_bandwidth_gbps)


def check_layout(adapter: ModelAdapter, layout: Layout, *, world_size: int, batch: LayoutSpec,
                 seq_len: int, samples: int) -> list[str]:
    """Why ``layout`` cannot run (empty: it can), in the trainers' own words."""
    moe = bool(adapter.num_experts)
    try:
        parallel = layout.parallel(moe)
        parallel.validate_model(num_layers=adapter.num_layers, num_attention_heads=adapter.attention.num_heads,
                                num_query_groups=adapter.attention.num_kv_heads, num_experts=adapter.num_experts,
                                expert_ffn_size=adapter.expert_ffn_hidden_size)
        dp = parallel.data_parallel_size(world_size)
    except ValueError as err:
        return [str(err)]
    reasons = []
    if samples % (layout.micro_batch * dp):
        reasons.append(f"--train_batch_size ({samples}) is not divisible by --micro_train_batch_size "
                       f"({layout.micro_batch}) x data parallel size ({dp})")
    multiple = parallel.sequence_multiple()
    if seq_len % multiple:
        reasons.append(f"--max_len ({seq_len}) is not a multiple of {multiple} (sequence parallel x 2 x context "
                       f"parallel chunks)")
    if layout.recompute_num_layers is not None and layout.recompute != "full":
        reasons.append("--recompute_num_layers needs --recompute_granularity full")
    return reasons


def make_plan(model: ModelSpec, cluster_spec: ClusterSpec, layout: Layout, batch: LayoutSpec, rollout: RolloutSpec,
              adapter: ModelAdapter, reward_adapter=None) -> Plan:
    cluster = cluster_of(cluster_spec)
    rl = model.job in ("ppo", "grpo")
    vllm = _vllm_plan(adapter, rollout, cluster_spec, seq_tokens=batch.max_len) if rl else None
    training_gpus = cluster.world_size - (0 if not rl or rollout.colocate_all_models else vllm["gpus"])
    seq_len = batch.max_len
    samples = batch.train_batch_size if not rl else rollout.rollout_batch_size * rollout.n_samples_per_prompt
    plan = Plan(job=model.job, layout=layout, world_size=cluster.world_size, training_gpus=training_gpus,
                data_parallel_size=0, vllm=vllm)
    if training_gpus < 1:
        plan.fits, plan.reasons = False, ["the vLLM engines take every GPU: lower --vllm_num_engines"]
        return plan
    roles = roles_of(model, rollout, adapter, reward_adapter)
    groups = device_groups(roles, separate=rl and not rollout.colocate_all_models)
    if training_gpus % len(groups):
        plan.fits, plan.reasons = False, [f"{training_gpus} training GPUs do not split evenly between the actor's "
                                          f"and the critic's devices"]
        return plan
    group_gpus = training_gpus // len(groups)
    plan.reasons = check_layout(adapter, layout, world_size=group_gpus, batch=batch, seq_len=seq_len,
                                samples=samples)
    if plan.reasons:
        plan.fits = False
        return plan
    moe = bool(adapter.num_experts)
    dp = layout.parallel(moe).data_parallel_size(group_gpus)
    plan.data_parallel_size = dp
    plan.groups = [{"roles": [r.name for r in group], "gpus": group_gpus} for group in groups]
    grid = Grid(tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=layout.ep, etp=layout.etp, dp=dp,
                sequence_parallel=layout.sequence_parallel)
    run = Activations(micro_batch=layout.micro_batch * SEQUENCES_PER_SAMPLE[model.job], seq_len=seq_len,
                      num_microbatches=samples // (layout.micro_batch * dp), bytes_per_value=2 if model.bf16 else 4,
                      recompute=layout.recompute, recompute_num_layers=layout.recompute_num_layers,
                      recompute_modules=layout.recompute_modules)
    per_group = [_stage_memory(group, layout, grid, run, model.bf16, rl=rl, rollout=rollout, cluster=cluster_spec)
                 for group in groups]
    plan.stages = [max(stages, key=lambda s: s["total_bytes"]) for stages in zip(*per_group)]
    plan.reasons = _memory_reasons(plan, (cluster.gpu_memory_gb - cluster_spec.reserved_memory_gb) * GB)
    plan.fits = not plan.reasons
    # Separate device groups (actor + reference, critic + reward) work at the same time: the slower one counts.
    timings = [_step_seconds(group, layout, grid, run, cluster, rollout=rollout if rl else None) for group in groups]
    plan.seconds = max(timings, key=lambda t: sum(t.values()))
    if vllm is not None:
        plan.seconds["generation"] = vllm["seconds"]
    return plan


def _memory_reasons(plan: Plan, usable_bytes: float) -> list[str]:
    reasons = [f"stage {s['stage']} needs {s['total_bytes'] / GB:.1f} GB per GPU, {usable_bytes / GB:.1f} GB usable "
               f"({', '.join(s['roles'])}: {s['phase']})" for s in plan.stages if s["total_bytes"] > usable_bytes]
    if plan.vllm and not plan.vllm["fits"]:
        reasons.append(plan.vllm["reason"])
    return reasons


def device_groups(roles: list[Role], *, separate: bool) -> list[list[Role]]:
    """Roles that share devices. Offline jobs and ``--colocate_all_models``: all of them. Otherwise
    OpenRLHF's layout with ``--colocate_actor_ref`` and ``--colocate_critic_reward``: the actor with
    the reference, the critic with the reward model, on equal halves of the training GPUs (without
    a critic the reward model joins the actor)."""
    names = {r.name for r in roles}
    if not separate or "critic" not in names:
        return [roles]
    return [[r for r in roles if r.name in ("actor", "reference")], [r for r in roles if r.name in ("critic", "reward")]]


def _stage_memory(roles: list[Role], layout: Layout, grid: Grid, run: Activations, bf16: bool, *, rl: bool,
                  rollout: RolloutSpec, cluster: ClusterSpec) -> list[dict]:
    per_role = []
    for role in roles:
        counts = meta.rank_params(role.adapter, layout.parallel(bool(role.adapter.num_experts)), bf16=bf16,
                                  value_head=role.value_head)
        shape = Shape.of(role.adapter, layout.tp)
        stage_layers = layout.parallel(bool(role.adapter.num_experts)).stage_num_layers(role.adapter.num_layers)
        stages = []
        for stage in meta.stage_params(counts, stage_layers):
            state = state_bytes(stage, grid, RoleState(role.trainable, bf16, layout.adam_offload), counts.param_bytes)
            acts = logits = plain = 0
            if role.trainable:
                kwargs = dict(moe_layers=_moe_layers_of_stage(role.adapter, stage.num_layers), value_head=role.value_head,
                              last=stage.stage == layout.pp - 1)
                acts, logits = activation_bytes(stage, shape, grid, run, **kwargs)
                plain = sum(activation_bytes(stage, shape, grid, replace(run, recompute="none"), **kwargs))
            stages.append(dict(params=stage.total, acts=acts, logits=logits, plain=plain, **state))
        per_role.append((role, stages))
    out = []
    for k in range(layout.pp):
        categories = dict.fromkeys(("weights", "grads", "optimizer", "activations", "logits"), 0)
        host = 0
        for role, stages in per_role:
            s = stages[k]
            host += s["optimizer_host"]
            if role.offloaded:
                host += s["weights"]
                continue
            for key in ("weights", "grads", "optimizer"):
                categories[key] += s[key]
        trained = [stages[k] for role, stages in per_role if role.trainable]
        # Trained roles take turns (actor, then critic): the larger step's activations are the peak.
        peak_step = max(trained, key=lambda s: s["acts"] + s["logits"])
        categories["activations"], categories["logits"] = peak_step["acts"], peak_step["logits"]
        phase = "training"
        total = sum(categories.values())
        if rl and rollout.colocate_all_models:
            generating = rollout.vllm_gpu_memory_utilization * cluster.gpu_memory_gb * GB + sum(
                stages[k]["weights"] for role, stages in per_role if not role.trainable and not role.offloaded)
            if generating > total:
                phase, total = "generation (vLLM engines awake, training state parked)", int(generating)
        out.append({"stage": k, "roles": [role.name for role, _ in per_role],
                    "num_parameters": per_role[0][1][k]["params"], "bytes": categories,
                    "activations_without_recompute_bytes": max(s["plain"] for s in trained),
                    "host_bytes": host, "total_bytes": int(total), "phase": phase})
    return out


def _moe_layers(adapter: ModelAdapter) -> int:
    if not adapter.num_experts:
        return 0
    flags = adapter.layer_spec_options().moe_layers
    return sum(flags) if flags else adapter.num_layers


def _moe_layers_of_stage(adapter: ModelAdapter, stage_layers: int) -> int:
    """The MoE layers a stage of ``stage_layers`` layers is counted with: its share of the model's (the
    activations estimate does not place the dense layers)."""
    return _moe_layers(adapter) * stage_layers // adapter.num_layers


def active_params(adapter: ModelAdapter, bf16: bool, value_head: bool) -> tuple[int, int]:
    """(total, active per token) parameters of the whole model, from a TP=1 count."""
    counts = meta.rank_params(adapter, ParallelConfig(), bf16=bf16, value_head=value_head)
    dense = counts.output + sum(x.dense for x in counts.layers)  # the embedding lookup costs no FLOPs
    expert = sum(x.expert for x in counts.layers)
    total = counts.embedding + counts.final_norm + dense + expert
    top_k = getattr(adapter.hf_config, "num_experts_per_tok", 0) or 0
    active = dense + (expert * top_k // adapter.num_experts if adapter.num_experts else 0)
    return total, active


def _step_seconds(roles, layout: Layout, grid: Grid, run: Activations, cluster: Cluster, *, rollout) -> dict:
    seconds: dict[str, float] = {}
    tokens_per_mb = run.micro_batch * run.seq_len
    for role in roles:
        _, active = active_params(role.adapter, run.bytes_per_value == 2, role.value_head)
        shape = Shape.of(role.adapter, layout.tp)
        counts = meta.rank_params(role.adapter, layout.parallel(bool(role.adapter.num_experts)),
                                  bf16=run.bytes_per_value == 2, value_head=role.value_head)
        stage_layers = layout.parallel(bool(role.adapter.num_experts)).stage_num_layers(role.adapter.num_layers)
        first = meta.stage_params(counts, stage_layers)[0]
        # forward_only per pass: training; the actor's old log-probs; a frozen model's scores, the critic's values
        passes = [False] if role.trainable else []
        if not role.trainable or rollout is not None:
            passes.append(True)
        for forward_only in passes:
            work = Work(tokens_per_microbatch=tokens_per_mb, num_microbatches=run.num_microbatches,
                        seq_len=run.seq_len, bytes_per_value=run.bytes_per_value,
                        recompute_full=run.recompute == "full" and not forward_only, forward_only=forward_only)
            parts = step_seconds(work, active_params=active, rank_params=first.total, expert_rank_params=first.expert,
                                 shape=shape, num_layers=role.adapter.num_layers, stage_layers=max(stage_layers),
                                 num_moe_layers=_moe_layers(role.adapter), grid=grid, cluster=cluster)
            for key, value in parts.items():
                seconds[key] = seconds.get(key, 0.0) + value
    return seconds


def _vllm_plan(adapter: ModelAdapter, rollout: RolloutSpec, cluster: ClusterSpec, *, seq_tokens: int) -> dict:
    total, _ = active_params(adapter, True, False)
    weight_bytes = total * 2  # engines run bf16
    tp = rollout.vllm_tensor_parallel_size or _smallest_engine_tp(weight_bytes, cluster)
    world = cluster.nodes * cluster.gpus_per_node
    engines = rollout.vllm_num_engines or (world // tp if rollout.colocate_all_models else max(world // 4 // tp, 1))
    budget = rollout.vllm_gpu_memory_utilization * cluster.gpu_memory_gb * GB
    kv_per_token = adapter.kv_cache_values_per_token(tp) * 2  # bf16; MLA: the latent, not K/V (the adapter's)
    kv_bytes = budget - weight_bytes / tp - VLLM_OVERHEAD_BYTES
    concurrent = int(kv_bytes // (kv_per_token * seq_tokens)) if kv_bytes > 0 else 0
    sequences = rollout.rollout_batch_size * rollout.n_samples_per_prompt
    plan = {"engines": engines, "tensor_parallel_size": tp, "gpus": engines * tp,
            "weights_per_gpu_bytes": int(weight_bytes / tp), "kv_cache_per_gpu_bytes": int(max(kv_bytes, 0)),
            "kv_cache_bytes_per_token": kv_per_token,
            "concurrent_sequences": concurrent, "per_gpu_bytes": int(budget), "fits": concurrent > 0, "reason": ""}
    if not plan["fits"]:
        plan["reason"] = (f"vLLM at TP {tp}: {weight_bytes / tp / GB:.1f} GB of weights per GPU leave no KV cache "
                          f"in {budget / GB:.1f} GB (--vllm_gpu_memory_utilization): raise --vllm_tensor_parallel_size")
    plan["seconds"] = decode_seconds(new_tokens=rollout.generate_max_len,
                                     sequences_per_engine=math.ceil(sequences / engines), concurrent=concurrent,
                                     weight_bytes_per_gpu=weight_bytes / tp, cluster=cluster_of(cluster))
    return plan


def _smallest_engine_tp(weight_bytes: float, cluster: ClusterSpec) -> int:
    tp = 1
    while tp < cluster.gpus_per_node and weight_bytes / tp > 0.5 * cluster.gpu_memory_gb * GB:
        tp *= 2
    return tp
