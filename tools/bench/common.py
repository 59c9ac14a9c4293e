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


def reference_model(directory: str, *, quick: bool = False, arch: str = "llama") -> str:
    """Build workload W's model (or a small one with ``quick``) under ``directory``."""
    from models.tiny import build_tiny_model

    shape = (QUICK_MODEL if quick else REFERENCE_MODEL) | (QWEN_QUICK_SHAPE if quick else QWEN_SHAPE).get(arch, {})
    return build_tiny_model(arch, f"{directory}/{arch}", **shape)


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
