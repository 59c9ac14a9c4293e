"""QLoRA: the frozen base linears of the decoder held in NF4 (bitsandbytes), dequantised per layer.

After the base weights are loaded, every Column / Row parallel linear of the decoder layers keeps
its weight as a 4-bit NF4 buffer (``weight_nf4``, blocks of 64 with their absmax) instead of the
full-precision parameter; its ``weight`` becomes the dequantised tensor, made in the layer's
forward and freed after it. The parameter stays registered as an empty placeholder, so names,
checkpoints and the weight map are unchanged (``models.lora.apply.merged_tensor_of`` exports the
dequantised weight). Each TP rank quantises its own shard: NF4 blocks follow the shard, so TP
sizes agree only up to the quantisation error.
"""
from __future__ import annotations

import re

import torch

from models.lora.layers import LORA_MODULE

_DECODER_LINEAR = re.compile(r"^decoder\.layers\.\d+\.(self_attention\.linear_(qkv|proj)|mlp\.(.*\.)?linear_fc[12])$")
INSTALL_HINT = ("--load_in_4bit needs bitsandbytes (NF4 quantisation; 0.50 runs on CPU too): "
                "pip install bitsandbytes==0.50.2, or train without --load_in_4bit")


def _bnb():
    try:
        import bitsandbytes.functional as functional
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return functional


class Nf4WeightMixin:
    """Mixed in front of a (LoRA-)linear class: ``weight`` reads the NF4 buffer, dequantised."""

    @property
    def weight(self) -> torch.Tensor:
        return _bnb().dequantize_4bit(self.weight_nf4, self.weight_quant_state)

    def base_weight(self) -> torch.Tensor:
        return self.weight


_CLASSES: dict[type, type] = {}


def _nf4_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Nf4{base.__name__}", (Nf4WeightMixin, base), {})
    return _CLASSES[base]


def quantize_base_linears(model) -> dict[str, int]:
    """Quantise this rank's decoder linears in place; ``{"base_bytes_before", "base_bytes_after"}``."""
    functional = _bnb()
    before = after = 0
    for name, module in list(model.named_modules()):
        if _DECODER_LINEAR.match(name) is None or isinstance(module, Nf4WeightMixin):
            continue
        weight = module._parameters["weight"]
        assert not weight.requires_grad, f"{name}: a trained weight cannot be held in NF4"
        packed, state = functional.quantize_4bit(weight.data, quant_type="nf4", blocksize=64)
        before += weight.numel() * weight.element_size()
        after += packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        module.__class__ = _nf4_class(type(module))
        module.register_buffer("weight_nf4", packed, persistent=False)
        module.weight_quant_state = state
        # The placeholder keeps the name (and the dtype the forward casts to) without the storage.
        placeholder = torch.nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)
        module._parameters["weight"] = placeholder
    return {"base_bytes_before": before, "base_bytes_after": after}


def is_quantized_name(name: str) -> bool:
    return name.endswith(".weight") and LORA_MODULE not in name and _DECODER_LINEAR.match(name[: -len(".weight")])
