"""Tiny HF checkpoints built locally (no downloads) for tests, the demo and benchmarks.

    from models.tiny import build_tiny_model
    path = build_tiny_model("llama", "/tmp/tiny-llama")       # config + weights + tokenizer
    AutoModelForCausalLM.from_pretrained(path); AutoTokenizer.from_pretrained(path)

The tokenizer is a byte-level BPE trained here on a synthetic corpus (digits split one per
token, so arithmetic and copy tasks tokenise predictably), with bos/eos/pad and a ChatML
chat template.
"""
from __future__ import annotations

import os
import random
from functools import lru_cache
from pathlib import Path

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHITECTURES = ("llama", "qwen2", "mistral", "mixtral")  # the shared ``tiny_models`` fixture builds these
#: The 2026 families, built from transformers' own config classes with odd sizes (hidden 48, head_dim
#: 20 != 48 / 4, experts of 40, dense layers between MoE layers) so a wrong split or stride shows.
QWEN_ARCHITECTURES = ("qwen3", "qwen3_moe", "qwen2_moe")
_ODD = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
#: Multi-head latent attention + sigmoid-routed MoE, odd sizes (``_deepseek_config``).
DEEPSEEK_ARCHITECTURES = ("deepseek_v3", "deepseek_v2")
#: GQA with partial rotary, q/k/v biases and qk-norm + DeepSeek-V3's sigmoid-routed MoE (``_glm4_moe_config``).
GLM_ARCHITECTURES = ("glm4_moe",)

_WORDS = (
    "the a an of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came show every good me "
    "give our under name very through just form sentence great think say help low line differ turn "
    "cause much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow act "
    "why ask men change went light kind off need house picture try us again animal point mother "
    "world near build self earth father question answer user assistant system reward sum copy "
    "reverse count repeat plus minus times equals yes no true false hello please thanks"
).split()


def _corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        if rng.random() < 0.5:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            words += [f"{a}+{b}={a + b}", f"{a} - {b} = {a - b}"]
        line = " ".join(words)
        lines.append(line.capitalize() + rng.choice([".", "?", "!", ",", ":", ";"]))
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


@lru_cache(maxsize=4)
def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer.to_str()


def build_tokenizer(vocab_size: int = 500):
    """A fast HF tokenizer with bos/eos/pad and a chat template, trained locally."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_train_tokenizer(vocab_size)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str, vocab_size: int, **overrides):
    """An HF config of a tiny model of ``arch`` (one of ARCHITECTURES)."""
    from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if arch == "llama":
        config = LlamaConfig(**{**common, "rope_theta": 10000.0, **overrides})
    elif arch == "qwen2":
        # Qwen2 small sizes tie embeddings and carry q/k/v biases.
        config = Qwen2Config(**{**common, "tie_word_embeddings": True, "rope_theta": 1000000.0, **overrides})
    elif arch == "mistral":
        config = MistralConfig(**{**common, "sliding_window": None, **overrides})
    elif arch == "mixtral":
        config = MixtralConfig(
            **{**common, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None, **overrides}
        )
    elif arch in DEEPSEEK_ARCHITECTURES:
        config = _deepseek_config(arch, common, overrides)
    elif arch in QWEN_ARCHITECTURES:
        config = _qwen_config(arch, {**common, **_ODD}, overrides)
    elif arch in GLM_ARCHITECTURES:
        config = _glm4_moe_config({**common, **_ODD}, overrides)
    else:
        known = ARCHITECTURES + DEEPSEEK_ARCHITECTURES + QWEN_ARCHITECTURES + GLM_ARCHITECTURES
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(known)}")
    return config


def _qwen_config(arch: str, common: dict, overrides: dict):
    from transformers import Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40, intermediate_size=72)
    if arch == "qwen3":  # small Qwen3s tie the embeddings
        return Qwen3Config(**{**common, "head_dim": 20, "intermediate_size": 80, "tie_word_embeddings": True,
                              "rope_theta": 1000000.0, **overrides})
    if arch == "qwen3_moe":  # layer 1 dense (mlp_only_layers), the others MoE; renormalised top-k
        return Qwen3MoeConfig(**{**common, **moe, "head_dim": 20, "norm_topk_prob": True, "mlp_only_layers": [1],
                                 "decoder_sparse_step": 1, "rope_theta": 1000000.0, **overrides})
    # qwen2_moe: MoE every second layer (decoder_sparse_step 2: layers 1 and 3), a gated shared expert
    return Qwen2MoeConfig(**{**common, **moe, "shared_expert_intermediate_size": 56, "norm_topk_prob": False,
                             "decoder_sparse_step": 2, "qkv_bias": True, "rope_theta": 1000000.0, **overrides})


def _deepseek_config(arch: str, common: dict, overrides: dict):
    """A tiny DeepSeek-V3: hidden 48, 4 heads of 12 plain + 8 rotary dims for q/k and 10 for v, a q LoRA
    rank (``q_lora_rank=None`` overrides it away), YaRN rope; layer 0 dense, the others MoE: top-2 of 8
    experts within the best of 2 groups, one shared expert. deepseek_v2: softmax routing, top-2 of 8 in
    the best 2 of 4 groups (group_limited_greedy), two shared experts."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    sizes = dict(hidden_size=48, intermediate_size=72, moe_intermediate_size=40, num_attention_heads=4,
                 num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
                 v_head_dim=10)
    moe = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
               first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0)
    rope = dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "mscale": 1.0, "mscale_all_dim": 1.0})
    if arch == "deepseek_v2":
        moe.update(n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=1.5,
                   topk_method="group_limited_greedy")
        for key in ("norm_topk_prob", "num_nextn_predict_layers"):
            moe.pop(key)
        return DeepseekV2Config(**{**common, **sizes, **moe, **rope, **overrides})
    # Keys real DeepSeek-V3 checkpoints carry and transformers ignores; vLLM builds the router bias only with them.
    vllm_keys = dict(topk_method="noaux_tc", scoring_func="sigmoid")
    return DeepseekV3Config(**{**common, **sizes, **moe, **rope, **vllm_keys, "rope_interleave": True, **overrides})


def _glm4_moe_config(common: dict, overrides: dict):
    """A tiny GLM-4.5: hidden 48, 4 q heads and 2 kv heads of 20 dims (!= 48 / 4), half of each rotated
    (``partial_rotary_factor`` 0.5: 10 dims), q/k/v biases and qk-norm; layer 0 dense, the others MoE:
    top-2 of 8 experts within the best of 2 groups, one shared expert, ``routed_scaling_factor`` 2.5."""
    from transformers import Glm4MoeConfig

    sizes = dict(head_dim=20, intermediate_size=72, moe_intermediate_size=40, attention_bias=True, use_qk_norm=True)
    moe = dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
               first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True, num_nextn_predict_layers=0)
    rope = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    return Glm4MoeConfig(**{**common, **sizes, **moe, **rope, **overrides})


def _randomise_router_bias(model, seed: int) -> None:
    """HF initialises DeepSeek's ``e_score_correction_bias`` to zeros; a test model needs one that changes the
    choice of experts (about the spread of the sigmoid scores)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.1)


def build_tiny_model(
    arch: str,
    save_dir: str | os.PathLike,
    *,
    seed: int = 0,
    vocab_size: int = 500,
    init_std: float | None = None,
    **config_overrides,
) -> str:
    """Create, randomly initialise and ``save_pretrained`` a tiny ``arch`` model with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, vocab_size, **config_overrides)
    if init_std is not None:
        config.initializer_range = init_std
    # AutoTokenizer picks a model-specific class from config.json (Qwen2's adds <|endoftext|>):
    # size the embedding by the tokenizer users will actually load.
    config.save_pretrained(save_dir)
    build_tokenizer(vocab_size).save_pretrained(save_dir)
    config.vocab_size = len(AutoTokenizer.from_pretrained(save_dir))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomise_router_bias(model, seed)
    model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(save_dir)
    return str(save_dir)
