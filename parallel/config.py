"""Typed parallelism configuration, validated where it is defined."""
from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.options import option


@dataclass(kw_only=True)
class ParallelConfig:
    """Sizes of the Megatron parallel dimensions. Data parallel is what remains of the world.

    Flag names follow Megatron (``--tensor_model_parallel_size`` ...); errors name the flag.
    """

    tensor_model_parallel_size: int = option(1, help="tensor parallel size (Megatron)")
    pipeline_model_parallel_size: int = option(1, help="pipeline parallel stages (1F1B schedule)")
    context_parallel_size: int = option(1, aliases=("ring_attn_size",),
                                        help="context parallel size: ring attention over the sequence")
    expert_model_parallel_size: int = option(1, help="expert parallel size (MoE), carved out of DP x CP")
    expert_tensor_parallel_size: int | None = option(
        None, help="tensor parallel size inside each expert (MoE; default: --tensor_model_parallel_size)")
    sequence_parallel: bool = option(False, help="Megatron sequence parallelism (needs TP > 1)")

    def __post_init__(self) -> None:
        for flag in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            value = getattr(self, flag)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{flag} must be a positive integer, got {value!r}")
        etp = self.expert_tensor_parallel_size
        if etp is not None and (not isinstance(etp, int) or etp < 1):
            raise ValueError(f"--expert_tensor_parallel_size must be a positive integer, got {etp!r}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence_parallel needs --tensor_model_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    @property
    def expert_tensor_parallel(self) -> int:
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    @property
    def expert_grid_size(self) -> int:
        """Ranks one copy of the experts spans: expert TP x EP x PP (the rest is expert data parallel)."""
        return self.expert_tensor_parallel * self.expert_model_parallel_size * self.pipeline_model_parallel_size

    def minimum_world_size(self) -> int:
        """The smallest world both grids fit: the dense one (TP x PP x CP, then DP) and the experts'
        (expert TP x EP x PP, then expert DP)."""
        return math.lcm(self.model_parallel_size, self.expert_grid_size)

    def sequence_multiple(self) -> int:
        """Sequence lengths must be multiples of this (sequence-parallel shards x zigzag CP chunks)."""
        tp = self.tensor_model_parallel_size if self.sequence_parallel else 1
        cp = self.context_parallel_size
        return tp * 2 * cp if cp > 1 else tp

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises if the model-parallel grid does not divide it."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by --tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x --pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x --context_parallel_size "
                f"({self.context_parallel_size}) = {self.model_parallel_size}"
            )
        data_parallel = world_size // self.model_parallel_size
        # Megatron lays the experts out over the same ranks: expert TP x EP x PP, then expert DP.
        if world_size % self.expert_grid_size:
            if self.expert_tensor_parallel_size is None:
                raise ValueError(
                    f"--expert_model_parallel_size ({self.expert_model_parallel_size}) must divide "
                    f"data parallel x context parallel size ({data_parallel * self.context_parallel_size})"
                )
            raise ValueError(
                f"world size {world_size} is not divisible by --expert_tensor_parallel_size "
                f"({self.expert_tensor_parallel}) x --expert_model_parallel_size ({self.expert_model_parallel_size}) "
                f"x --pipeline_model_parallel_size ({self.pipeline_model_parallel_size}) = {self.expert_grid_size}"
            )
        return data_parallel

    def validate_model(
        self,
        *,
        num_layers: int,
        num_attention_heads: int,
        num_query_groups: int,
        num_experts: int | None = None,
        expert_ffn_size: int | None = None,
    ) -> None:
        """Check that the model's shapes split evenly over this grid."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if num_attention_heads % tp:
            raise ValueError(
                f"--tensor_model_parallel_size ({tp}) must divide the number of attention heads "
                f"({num_attention_heads})"
            )
        if num_query_groups % tp:
            raise ValueError(
                f"--tensor_model_parallel_size ({tp}) must divide the number of key/value heads "
                f"({num_query_groups})"
            )
        if num_layers % pp:
            raise ValueError(
                f"--pipeline_model_parallel_size ({pp}) must divide the number of layers ({num_layers})"
            )
        ep = self.expert_model_parallel_size
        if ep > 1 and not num_experts:
            raise ValueError(f"--expert_model_parallel_size ({ep}) needs a mixture-of-experts model")
        if num_experts and num_experts % ep:
            raise ValueError(
                f"--expert_model_parallel_size ({ep}) must divide the number of experts ({num_experts})"
            )
        if self.expert_tensor_parallel_size is not None and not num_experts:
            raise ValueError("--expert_tensor_parallel_size needs a mixture-of-experts model")
        etp = self.expert_tensor_parallel
        if num_experts and expert_ffn_size and expert_ffn_size % etp:
            raise ValueError(
                f"--expert_tensor_parallel_size ({etp}) must divide the experts' hidden size ({expert_ffn_size})"
            )
