"""Mistral: Llama layout. Sliding-window attention is exact only for sequences within the window."""
from models.adapter import ModelAdapter


class MistralAdapter(ModelAdapter):
    model_types = ("mistral",)
    hf_causal_lm_class = "MistralForCausalLM"

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence whose full causal attention equals Mistral's sliding-window attention."""
        window = getattr(self.hf_config, "sliding_window", None)
        return min(window or self.hf_config.max_position_embeddings, self.hf_config.max_position_embeddings)
