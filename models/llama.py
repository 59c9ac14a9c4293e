"""Llama (1/2/3.x): the base decoder layout; llama3 rope scaling is carried to Megatron."""
from models.adapter import ModelAdapter


class LlamaAdapter(ModelAdapter):
    model_types = ("llama",)
    hf_causal_lm_class = "LlamaForCausalLM"
