"""LoRA / QLoRA on the Megatron model: options, targets, adapted linears, export.

The adapted linears (``models.lora.apply``) are imported on first use, so that a job's parser,
which needs only ``LoraConfig``, imports no torch."""
from models.lora.config import ALL_LINEAR, LoraConfig

__all__ = ["ALL_LINEAR", "LoraConfig", "adapters_disabled", "apply_lora", "has_lora", "is_lora_name",
           "lora_linears", "merged_tensor_of"]
_APPLY = {"adapters_disabled", "apply_lora", "has_lora", "is_lora_name", "lora_linears", "merged_tensor_of"}


def __getattr__(name: str):
    if name in _APPLY:
        from models.lora import apply

        return getattr(apply, name)
    raise AttributeError(f"module 'models.lora' has no attribute {name!r}")
