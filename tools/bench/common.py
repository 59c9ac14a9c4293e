"""Shared pieces of the benchmarks: the reference workload W and result tables."""
from __future__ import annotations

# Workload W (DESIGN.md): Llama architecture, hidden 512, 8 layers, 8 heads / 4 KV heads,
# intermediate 1408, the local tokenizer (~500 tokens): ~24M parameters.
REFERENCE_MODEL = dict(
    hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408,
    max_position_embeddings=2048,
)
QUICK_MODEL = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
    max_position_embeddings=2048,
)


#: W's shape in the Qwen families: head_dim hidden / heads (the tiny builders' odd defaults are for
#: tests), Qwen3-MoE's 4 experts of half W's MLP width in every layer (top-2, as the Mixtral bench).
QWEN_SHAPE = {"qwen3": dict(head_dim=64), "qwen3_moe": dict(head_dim=64, moe_intermediate_size=704, mlp_only_layers=[])}
QWEN_QUICK_SHAPE = {"qwen3": dict(head_dim=32), "qwen3_moe": dict(head_dim=32, moe_intermediate_size=128,
                                                                  mlp_only_layers=[])}

#: W's shape as DeepSeek-V3 and GLM-4.5 (their layer pattern: the first layer dense, the others MoE
#: with 4 routed experts of half W's MLP width, top-2, one shared expert of that width, sigmoid
#: routing with the expert bias, routed_scaling_factor 2.5, no group limit). DeepSeek-V3's MLA keeps
#: W's 64 dims a head for the plain q/k part and v, adds 32 rotary dims (V3's 128 + 64, halved), and
#: compresses q and kv through ranks of hidden / 4 (Moonlight's kv_lora_rank / hidden). GLM-4.5:
#: W's heads of 64 dims, half rotated, q/k/v biases and qk-norm (GLM-4.5 355B's).
_FRONTIER_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                     first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True)
FRONTIER_SHAPE = {
    "deepseek_v3": dict(_FRONTIER_MOE, num_key_value_heads=8, moe_intermediate_size=704, q_lora_rank=128,
                        kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),
    "glm4_moe": dict(_FRONTIER_MOE, moe_intermediate_size=704, head_dim=64),
}
FRONTIER_QUICK_SHAPE = {
    "deepseek_v3": dict(_FRONTIER_MOE, num_key_value_heads=4, moe_intermediate_size=128, q_lora_rank=32,
                        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
    "glm4_moe": dict(_FRONTIER_MOE, moe_intermediate_size=128, head_dim=32),
}


def reference_model(directory: str, *, quick: bool = False, arch: str = "llama", **overrides) -> str:
    """Build workload W's model (or a small one with ``quick``) under ``directory`` (``overrides``: HF config keys)."""
    from models.tiny import build_tiny_model

    shape = (QUICK_MODEL if quick else REFERENCE_MODEL) | (QWEN_QUICK_SHAPE if quick else QWEN_SHAPE).get(arch, {})
    shape |= (FRONTIER_QUICK_SHAPE if quick else FRONTIER_SHAPE).get(arch, {})
    return build_tiny_model(arch, f"{directory}/{arch}", **(shape | overrides))


def print_table(title: str, header: list[str], rows: list[tuple]) -> None:
    cells = [[str(h) for h in header]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * width for width in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def run_on_local_ranks(worker, world_size: int, *args):
    """``worker(*args, result_file)`` on ``world_size`` spawned ranks (threads split between
    them); returns what rank 0 saved to ``result_file`` with ``torch.save``."""
    import os
    import tempfile

    import torch

    from parallel.launch import spawn_local_ranks

    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pt")
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world_size))
        spawn_local_ranks(worker, world_size, *args, result_file)
        return torch.load(result_file)


def drain_weight_buckets(spec: dict, rounds: int) -> None:
    """A bare weight receiver (a process of its own): join the group, take every bucket of ``rounds``
    updates, load nothing."""
    import torch

    from parallel.weight_transfer import open_receiver

    receiver = open_receiver(spec, rank=1, device=torch.device("cpu"))
    for _ in range(rounds):
        for _bucket in receiver.buckets():
            pass
        receiver.channel.barrier()  # the sender stops its clock once everything arrived
