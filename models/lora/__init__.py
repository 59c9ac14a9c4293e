"""LoRA / QLoRA on the Megatron model: options, targets, adapted linears, export."""
from models.lora.apply import adapters_disabled, apply_lora, has_lora, is_lora_name, lora_linears, merged_tensor_of
from models.lora.config import ALL_LINEAR, LoraConfig

__all__ = ["ALL_LINEAR", "LoraConfig", "adapters_disabled", "apply_lora", "has_lora", "is_lora_name",
           "lora_linears", "merged_tensor_of"]
