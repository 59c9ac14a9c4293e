"""Architecture lookup by HF ``config.model_type``."""
from __future__ import annotations

import os

from models.adapter import ModelAdapter
from models.deepseek_v2 import DeepseekV2Adapter
from models.deepseek_v3 import DeepseekV3Adapter
from models.glm4_moe import Glm4MoeAdapter
from models.llama import LlamaAdapter
from models.mistral import MistralAdapter
from models.mixtral import MixtralAdapter
from models.qwen2 import Qwen2Adapter
from models.qwen2_moe import Qwen2MoeAdapter
from models.qwen3 import Qwen3Adapter
from models.qwen3_moe import Qwen3MoeAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaAdapter, Qwen2Adapter, MistralAdapter, MixtralAdapter, Qwen3Adapter,
                                            Qwen3MoeAdapter, Qwen2MoeAdapter, DeepseekV3Adapter, DeepseekV2Adapter,
                                            Glm4MoeAdapter)


def supported_model_types() -> list[str]:
    return [t for adapter in ADAPTERS for t in adapter.model_types]


def get_adapter(hf_config) -> ModelAdapter:
    """The adapter for an HF config; a clear error listing what is supported otherwise."""
    model_type = getattr(hf_config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(hf_config)
    raise ValueError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


def load_adapter(hf_path: str | os.PathLike) -> ModelAdapter:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(hf_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read an HF config from {hf_path}: {exc}") from exc
    return get_adapter(config)
