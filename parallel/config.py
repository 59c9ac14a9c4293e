"""Typed parallelism configuration, validated where it is defined."""
from __future__ import annotations

import math
from dataclasses import dataclass

from parallel.options import option

UNEVEN_FLAGS = ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers")


@dataclass(kw_only=True)
class ParallelConfig:
    """Sizes of the Megatron parallel dimensions. Data parallel is what remains of the world.

    Flag names follow Megatron (``--tensor_model_parallel_size`` ...); errors name the flag.
    """

    tensor_model_parallel_size: int = option(1, help="tensor parallel size (Megatron)")
    pipeline_model_parallel_size: int = option(1, help="pipeline parallel stages (1F1B schedule)")
    decoder_first_pipeline_num_layers: int | None = option(
        None, help="layers of the first pipeline stage (Megatron's uneven split; the other stages split the rest "
                   "evenly; default: an even split)")
    decoder_last_pipeline_num_layers: int | None = option(
        None, help="layers of the last pipeline stage (Megatron's uneven split; the other stages split the rest "
                   "evenly; default: an even split)")
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
        for flag in UNEVEN_FLAGS:
            value = getattr(self, flag)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{flag} must be a positive integer, got {value!r}")
            if value is not None and self.pipeline_model_parallel_size == 1:
                raise ValueError(f"--{flag} needs --pipeline_model_parallel_size > 1")
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

    @property
    def uneven_pipeline(self) -> bool:
        return any(getattr(self, flag) is not None for flag in UNEVEN_FLAGS)

    def stage_num_layers(self, num_layers: int) -> list[int]:
        """Layers of each pipeline stage, as megatron-core builds them: an even split, or the first / last
        stage's given count and the rest split evenly over the stages between. Raises, naming the flags,
        where the sizes do not add up (every stage needs a layer: megatron-core's rule)."""
        pp, first, last = (self.pipeline_model_parallel_size, self.decoder_first_pipeline_num_layers,
                           self.decoder_last_pipeline_num_layers)
        if not self.uneven_pipeline:
            if num_layers % pp:
                raise ValueError(
                    f"--pipeline_model_parallel_size ({pp}) must divide the number of layers ({num_layers}) "
                    f"(or set the uneven split: --decoder_first_pipeline_num_layers / "
                    f"--decoder_last_pipeline_num_layers)")
            return [num_layers // pp] * pp
        ends = [n for n in (first, last) if n is not None]
        middle_stages, middle_layers = pp - len(ends), num_layers - sum(ends)
        given = " + ".join(f"--{flag} ({getattr(self, flag)})" for flag in UNEVEN_FLAGS
                           if getattr(self, flag) is not None)
        leave = "leave" if len(ends) == 2 else "leaves"
        if middle_stages == 0 and middle_layers != 0:
            raise ValueError(f"{given} must add up to the number of layers ({num_layers}) at "
                             f"--pipeline_model_parallel_size {pp}")
        if middle_stages and (middle_layers < middle_stages or middle_layers % middle_stages):
            raise ValueError(
                f"{given} {leave} {middle_layers} of the {num_layers} layers for the {middle_stages} other pipeline "
                f"stage(s) of --pipeline_model_parallel_size {pp}: they must split evenly, at least one layer each")
        between = [middle_layers // middle_stages] * middle_stages if middle_stages else []
        return ([first] if first is not None else []) + between + ([last] if last is not None else [])

    def stage_layer_offsets(self, num_layers: int) -> list[int]:
        """The global index of each pipeline stage's first layer (megatron-core's layer offset)."""
        counts = self.stage_num_layers(num_layers)
        return [sum(counts[:stage]) for stage in range(len(counts))]

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
        tp = self.tensor_model_parallel_size
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
        self.stage_num_layers(num_layers)  # refuses a split that does not add up
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
