"""Qwen2 / Qwen2.5: Llama layout plus q/k/v biases; small sizes tie the embeddings."""
from models.adapter import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    model_types = ("qwen2",)
    hf_causal_lm_class = "Qwen2ForCausalLM"

    @property
    def qkv_bias(self) -> bool:
        return True
