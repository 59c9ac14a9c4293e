"""The planner's inputs as typed options: the model and job, the cluster, and (optionally) a layout.

Flag names are the trainers' where the concept is theirs (``--tensor_model_parallel_size``,
``--micro_train_batch_size``, ``--max_len``, ``--vllm_num_engines``, ``--colocate_all_models``...).
A layout field left unset (None) means "search it".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.build_config import RECOMPUTE_MODULES
from parallel.options import option

Job = Literal["sft", "dpo", "rm", "kto", "ppo", "grpo"]


@dataclass(kw_only=True)
class ModelSpec:
    model: str | None = option(None, help="HF model directory / config.json, or a built-in: llama3-8b, llama3-70b, "
                                          "llama3.1-405b, qwen2.5-72b, mixtral-8x7b, mixtral-8x22b, qwen3-8b, qwen3-32b, "
                                          "qwen3-30b-a3b, qwen3-235b-a22b, qwen2-57b-a14b, deepseek-v3, moonlight-16b-a3b, "
                                          "glm-4.5, glm-4.5-air (default: llama3-70b, or --from_checkpoint's model)")
    job: Job | None = option(None, help="what runs: sft, dpo, rm, kto, ppo (actor, critic, reference, reward model, "
                                        "vLLM engines) or grpo (actor, reference, vLLM engines) (default: sft, or "
                                        "what --from_checkpoint's run trained)")
    from_checkpoint: str | None = option(None, help="a training checkpoint (global_stepN, or a --ckpt_path: its "
                                                    "newest, an RL run's actor's): plan the layouts it resumes at "
                                                    "on this cluster (its model, job and saved layout)")
    reward_pretrain: str | None = option(None, help="ppo / grpo: the reward model (default: --model for ppo, none "
                                                    "for grpo, whose rewards are rules or a remote server)")
    fp32: bool = option(False, help="fp32 weights and activations (default: bf16, as on GPUs)")

    def __post_init__(self) -> None:
        if self.from_checkpoint and self.model is not None:
            raise ValueError("--from_checkpoint plans for the checkpoint's own model: drop --model")

    @property
    def bf16(self) -> bool:
        return not self.fp32


@dataclass(kw_only=True)
class ClusterSpec:
    nodes: int = option(1, help="nodes")
    gpus_per_node: int = option(8, help="GPUs per node")
    gpu_memory_gb: float = option(80.0, help="memory per GPU (GB, 10^9 bytes as vendors count)")
    reserved_memory_gb: float = option(4.0, help="per GPU, not for tensors: CUDA context, NCCL buffers, allocator "
                                                 "fragmentation")
    gpu_tflops: float = option(989.0, help="dense bf16 peak TFLOP/s per GPU (H100 SXM: 989)")
    mfu: float = option(0.45, help="assumed fraction of the peak the GEMMs reach (printed with every estimate)")
    intra_node_bandwidth_gbps: float = option(450.0, help="GB/s per GPU inside a node (NVLink 4: 450)")
    inter_node_bandwidth_gbps: float = option(50.0, help="GB/s per GPU between nodes (400 Gb/s InfiniBand: 50)")
    hbm_bandwidth_gbps: float = option(3350.0, help="GB/s of GPU memory (H100 SXM: 3350), for vLLM decoding")

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {self.mfu}")


@dataclass(kw_only=True)
class LayoutSpec:
    tensor_model_parallel_size: int | None = option(None, help="TP (unset: searched)")
    pipeline_model_parallel_size: int | None = option(None, help="PP (unset: searched)")
    decoder_first_pipeline_num_layers: int | None = option(
        None, help="layers of the first pipeline stage (uneven split; default: even)")
    decoder_last_pipeline_num_layers: int | None = option(
        None, help="layers of the last pipeline stage (uneven split; default: even)")
    context_parallel_size: int | None = option(None, help="CP, ring attention (unset: searched)")
    expert_model_parallel_size: int | None = option(None, help="EP, MoE (unset: searched)")
    expert_tensor_parallel_size: int | None = option(None, help="TP inside each expert (default: 1 with EP > 1, "
                                                                "as the LoRA / local paths need; else TP)")
    sequence_parallel: bool | None = option(None, value_aliases={"no_sequence_parallel": False},
                                            help="Megatron sequence parallelism (unset: on whenever TP > 1)")
    recompute_granularity: Literal["none", "full", "selective"] | None = option(
        None, help="activation recompute: full (each layer keeps only its input), selective (--recompute_modules), "
                   "none (unset: searched)")
    recompute_num_layers: int | None = option(None, help="full recompute: layers per stage recomputed (default: all)")
    recompute_modules: tuple[str, ...] | None = option(
        None, help="selective recompute: Megatron modules among core_attn, layernorm, mlp (default: core_attn)")
    adam_offload: bool = option(False, help="optimizer state in host memory (Megatron's optimizer CPU offload)")
    micro_train_batch_size: int = option(1, help="sequences per micro-batch (pairs for dpo / rm)")
    train_batch_size: int = option(128, help="global batch (samples per optimizer step)")
    max_len: int = option(4096, help="tokens per sample (prompt + response for ppo / grpo)")

    def __post_init__(self) -> None:
        unknown = set(self.modules) - set(RECOMPUTE_MODULES)
        if unknown:
            raise ValueError(f"--recompute_modules: {', '.join(sorted(unknown))} not among {', '.join(RECOMPUTE_MODULES)}")
        for name in ("micro_train_batch_size", "train_batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")

    @property
    def modules(self) -> tuple[str, ...]:
        return self.recompute_modules or ("core_attn",)


@dataclass(kw_only=True)
class RolloutSpec:
    """ppo / grpo: the vLLM engines and where the models sit."""

    vllm_num_engines: int | None = option(None, help="vLLM engines (default: every GPU's share, colocated; "
                                                     "else a quarter of the GPUs)")
    vllm_tensor_parallel_size: int | None = option(None, help="TP of each engine (default: the smallest that "
                                                              "holds the weights in half a GPU)")
    vllm_gpu_memory_utilization: float = option(0.9, help="fraction of a GPU's memory an engine takes "
                                                          "(weights + KV cache)")
    colocate_all_models: bool = option(False, help="every model and the engines on the same GPUs; the engines "
                                                   "sleep while the models train, the models' training state is "
                                                   "parked while the engines generate")
    ref_reward_offload: bool = option(False, help="reference / reward weights in host memory between uses")
    init_kl_coef: float = option(0.01, help="KL coefficient (0: no reference model)")
    rollout_batch_size: int = option(128, help="prompts per rollout")
    n_samples_per_prompt: int = option(8, help="responses per prompt")
    generate_max_len: int = option(1024, help="response tokens")

    def __post_init__(self) -> None:
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")


@dataclass(kw_only=True)
class OutputSpec:
    json: bool = option(False, help="print one JSON object instead of tables")
    top: int = option(8, help="layouts shown by a search")
