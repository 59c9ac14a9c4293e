"""Qwen3 (dense): Llama layout with a per-head RMSNorm on q and k before rotary, an explicit
``head_dim`` (Qwen3's is 128 whatever hidden / heads is), no q/k/v bias; small sizes tie the
embeddings. Refused: ``attention_bias`` (o_proj bias is not carried) and sliding windows."""
from models.adapter import ModelAdapter


class Qwen3Adapter(ModelAdapter):
    model_types = ("qwen3",)
    hf_causal_lm_class = "Qwen3ForCausalLM"

    def _check_supported(self) -> None:
        super()._check_supported()
        refuse_qwen_attention_options(self.hf_config)

    @property
    def qk_layernorm(self) -> bool:
        return True


def refuse_qwen_attention_options(hf_config) -> None:
    """What the Qwen adapters do not carry, refused with the config field named."""
    model_type = hf_config.model_type
    if getattr(hf_config, "attention_bias", False):
        raise ValueError(f"{model_type} with attention_bias=true is not supported (q/k/v/o biases are not mapped)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError(f"{model_type} with use_sliding_window=true is not supported: the Megatron model attends "
                         "in full (set use_sliding_window false, as every released Qwen checkpoint does)")
