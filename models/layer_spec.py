"""Which Megatron layer spec builds the decoder (Transformer Engine's or the local one), and the spec.

The choice is one pure function (:func:`choose_layer_spec`), unit-tested on CPU for every case;
:func:`block_spec` turns it into the ``TransformerBlockSubmodules`` of a pipeline stage.

- ``transformer_engine`` (default with TE importable and CUDA): TE's linears with the layer norms
  fused into ``linear_qkv`` / ``linear_fc1`` (names in ``models.adapter.TE_FUSED_NORM_NAMES``;
  MoE layers keep a separate ``pre_mlp_layernorm``) and ``TENorm`` for the final and q/k norms.
- ``local`` (no TE, a CPU, or ``--transformer_impl local``): megatron-core's own linears with
  ``models.norms.LocalNorm`` everywhere -- never ``WrappedTorchNorm`` (refuses sequence
  parallelism) nor Apex's ``FusedLayerNorm`` (what Megatron picks with Apex and no TE; it
  refuses RMSNorm).

Both keep our core attention (``parallel.attention.core_attention.CoreAttention``) rather than
TE's ``DotProductAttention``: ours implements the layouts this engine feeds it -- packed samples
as ``thd`` with the boundaries of ``engine.runtime.schedule.packed_seq_params``, the zigzag
context-parallel shards of ``parallel.context_parallel`` with ring attention, ``--ring_head_stride``
-- and is what the CPU equivalence tests check; on GPU it runs flash-attn (varlen for packing,
ring-flash-attn under CP). TE's attention has its own CP and packed-sequence conventions, which
this machine cannot test. The speed TE brings (fused norm + GEMM, its GEMMs) is in the linears.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from models.adapter import TE_FUSED_NORM_NAMES, LayerSpecOptions
from models.norms import FixedEpsNorm, LocalNorm
from parallel.attention.core_attention import CoreAttention

TransformerImpl = Literal["auto", "local", "transformer_engine"]  # also models.build_config's
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
_FUSED_NAME = {local: fused for fused, local in TE_FUSED_NORM_NAMES.items()}


@dataclass(frozen=True)
class LayerSpecChoice:
    """The implementation that builds the layers, and what that means for names and norms."""

    impl: Literal["local", "transformer_engine"]
    reason: str

    @property
    def norm_module(self) -> str:
        """The module of the final (and q/k) norms."""
        return "TENorm" if self.impl == "transformer_engine" else "LocalNorm"

    def layer_norm_names(self, *, moe: bool) -> dict[str, str]:
        """Megatron parameter names of a layer's input and pre-MLP norm weights, keyed by the local
        spec's names. TE fuses both into the next linear, except an MoE layer's pre-MLP norm."""
        names = {name: name for name in _FUSED_NAME}
        if self.impl == "transformer_engine":
            names["input_layernorm.weight"] = _FUSED_NAME["input_layernorm.weight"]
            if not moe:
                names["pre_mlp_layernorm.weight"] = _FUSED_NAME["pre_mlp_layernorm.weight"]
        return names


def choose_layer_spec(requested: str, *, te_available: bool, on_cuda: bool,
                      apex_available: bool = False, te_error: str = "") -> LayerSpecChoice:
    """``requested`` is ``--transformer_impl``. ``apex_available`` changes nothing (Apex's norm is
    never used: it refuses RMSNorm); it is an argument so that this stays said and tested.
    ``te_error``: why an installed TE does not load (``parallel.optional_deps.Probe.reason``)."""
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"--transformer_impl must be one of {', '.join(TRANSFORMER_IMPLS)}, got {requested!r}")
    if requested == "local":
        return LayerSpecChoice("local", "--transformer_impl local")
    if requested == "transformer_engine" and not (te_available and on_cuda):
        missing = "Transformer Engine (pip install transformer-engine[pytorch])" if not te_available else "CUDA"
        if te_error and not te_available:
            missing = f"a Transformer Engine that loads (the installed one fails: {te_error})"
        raise ValueError(f"--transformer_impl transformer_engine needs {missing}; --transformer_impl local runs without")
    if te_available and on_cuda:
        return LayerSpecChoice("transformer_engine", "Transformer Engine imports and CUDA is available")
    why = "no CUDA" if not on_cuda else "Transformer Engine does not import"
    if te_error and not te_available:
        why += f" (Transformer Engine is installed but fails to load: {te_error})"
    return LayerSpecChoice("local", why + (" (Apex alone is not used)" if apex_available else ""))


def detect_layer_spec(requested: str) -> LayerSpecChoice:
    """:func:`choose_layer_spec` for this process (TE as megatron-core's own spec module sees it: a TE
    that installs but fails to load is blocked before megatron imports, by
    ``parallel.megatron_patches.guard_transformer_engine``, whose probe gives the reason)."""
    import torch

    from parallel.megatron_patches import guard_transformer_engine

    te = guard_transformer_engine()
    return choose_layer_spec(requested, te_available=gpt_layer_specs.HAVE_TE and te.importable,
                             on_cuda=torch.cuda.is_available(), apex_available=gpt_layer_specs.HAVE_APEX,
                             te_error=te.reason if te.installed else "")


def _core_attention(ring_head_stride: int | None) -> ModuleSpec:
    # Options reach the attention through the spec (build_module passes ``params`` as kwargs).
    return ModuleSpec(module=CoreAttention, params={"ring_head_stride": ring_head_stride})


def _local_layer(options: LayerSpecOptions, *, moe: bool, normalization: str, ring_head_stride: int | None):
    mla = options.multi_latent_attention
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=options.num_experts if moe else None, moe_grouped_gemm=False,
        qk_layernorm=options.qk_layernorm or mla, normalization=normalization, multi_latent_attention=mla,
    )
    layer, attention = spec.submodules, spec.submodules.self_attention.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = LocalNorm
    if mla:  # the q and kv latents' RMSNorms (MLA always has the kv one; the q one with a q LoRA rank)
        attention.q_layernorm = attention.kv_layernorm = LocalNorm if options.latent_norm_eps is None else \
            ModuleSpec(module=FixedEpsNorm, params={"fixed_eps": options.latent_norm_eps})
    elif options.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = LocalNorm
    attention.core_attention = _core_attention(ring_head_stride)
    if moe:
        # The local spec saves every layer's pre-MLP norm under TE's fused name, but TE's MoE layers
        # keep a separate pre_mlp_layernorm: save MoE layers under that name, so that Megatron
        # checkpoints load under either implementation.
        layer.sharded_state_dict_keys_map = {
            k: v for k, v in layer.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."}
    return spec


def _te_layer(options: LayerSpecOptions, *, moe: bool, ring_head_stride: int | None, moe_grouped_gemm: bool):
    mla = options.multi_latent_attention
    if options.latent_norm_eps is not None:
        raise ValueError(f"latent attention whose q / kv latent norms use epsilon {options.latent_norm_eps} and the "
                         "other norms the config's rms_norm_eps needs --transformer_impl local: Transformer Engine "
                         "fuses the latent norms into the up-projections with one epsilon for all")
    spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        num_experts=options.num_experts if moe else None, moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=options.qk_layernorm or mla, multi_latent_attention=mla,
    )
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = _core_attention(ring_head_stride)
    if mla:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        # TE's spec keeps the down-projections whole on every TP rank (TELinear, duplicated); split them
        # over TP as the local spec does, so that one weight map (models.splits.Split.COLUMN) serves both.
        attention.linear_q_down_proj = attention.linear_kv_down_proj = TEColumnParallelLinear
    return spec


def block_spec(choice: LayerSpecChoice, options: LayerSpecOptions, *, layer_is_moe: list[bool],
               normalization: str, ring_head_stride: int | None,
               moe_grouped_gemm: bool = False) -> TransformerBlockSubmodules:
    """The specs of this stage's layers (``layer_is_moe``: one flag per local layer) and its final
    norm. A block spec, not a layer spec: given a bare layer spec, Megatron picks the final norm
    itself (``transformer_block.LayerNormImpl``: Apex's FusedLayerNorm when Apex imports)."""
    if choice.impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        specs = {moe: _te_layer(options, moe=moe, ring_head_stride=ring_head_stride, moe_grouped_gemm=moe_grouped_gemm)
                 for moe in set(layer_is_moe)}
        final_norm = TENorm
    else:
        specs = {moe: _local_layer(options, moe=moe, normalization=normalization, ring_head_stride=ring_head_stride)
                 for moe in set(layer_is_moe)}
        final_norm = LocalNorm
    return TransformerBlockSubmodules(layer_specs=[specs[moe] for moe in layer_is_moe], layer_norm=final_norm)
