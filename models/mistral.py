"""Mistral: Llama layout with sliding-window attention.

The Megatron model attends in full; within ``sliding_window`` tokens that is exactly Mistral's
attention, so longer samples are refused (``max_attention_span``) instead of trained on a
different model. Mistral 7B v0.2+ and most fine-tunes set no window: nothing is refused.
"""
from models.adapter import ModelAdapter


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)
    hf_causal_lm_class = "MistralForCausalLM"

    @property
    def max_attention_span(self) -> int | None:
        return getattr(self.hf_config, "sliding_window", None) or None
