"""The planner's output: readable tables, or one JSON object with the same figures."""
from __future__ import annotations

from tools.plan.plan import GB, Plan

CATEGORIES = ("weights", "grads", "optimizer", "activations", "logits")


def _is_saved(plan: Plan, checkpoint: dict | None) -> bool:
    from tools.plan.from_checkpoint import is_saved_layout

    layout = plan.layout
    role_gpus = plan.groups[0]["gpus"] if plan.groups else plan.training_gpus  # a checkpoint is one role's
    return checkpoint is not None and is_saved_layout(
        {"tp": layout.tp, "pp": layout.pp, "cp": layout.cp, "ep": layout.ep}, checkpoint["saved_layout"], role_gpus)


def plan_dict(plan: Plan, *, assumptions: dict, checkpoint: dict | None = None) -> dict:
    extra = {"saved_layout": _is_saved(plan, checkpoint)} if checkpoint is not None else {}
    return {**extra,
        "job": plan.job, "layout": plan.layout.label(), "fits": plan.fits, "reasons": plan.reasons,
        "world_size": plan.world_size, "training_gpus": plan.training_gpus,
        "data_parallel_size": plan.data_parallel_size, "groups": plan.groups, "stages": plan.stages, "vllm": plan.vllm,
        "step_seconds": plan.step_seconds, "seconds": plan.seconds, "peak_bytes": plan.peak_bytes,
        "assumptions": assumptions,
    }


def _gb(n: float) -> str:
    return f"{n / GB:7.1f}"


def format_plan(plan: Plan, *, assumptions: dict) -> str:
    lines = [f"{plan.job} on {plan.world_size} GPUs ({plan.training_gpus} training, DP {plan.data_parallel_size}): "
             f"{plan.layout.label()}"]
    if plan.groups:
        lines.append("devices: " + "; ".join(f"{' + '.join(g['roles'])} on {g['gpus']} GPUs" for g in plan.groups))
    if plan.stages:
        header = f"{'stage':>5} {'params/rank':>13} " + " ".join(f"{c:>11}" for c in CATEGORIES)
        lines += ["", "memory per GPU (GB; acts+logits w/o recompute: what recompute saves)",
                  header + f" {'total':>8} {'host':>7} {'w/o rec.':>8}  peak phase"]
        for s in plan.stages:
            lines.append(f"{s['stage']:>5} {s['num_parameters']:>13,} " + " ".join(
                f"{_gb(s['bytes'][c]):>11}" for c in CATEGORIES) + f" {_gb(s['total_bytes'])} {_gb(s['host_bytes'])}"
                f" {_gb(s['activations_without_recompute_bytes'])}  {s['phase']}")
    if plan.vllm:
        v = plan.vllm
        lines += ["", f"vLLM: {v['engines']} engine(s) x TP {v['tensor_parallel_size']}: weights "
                      f"{_gb(v['weights_per_gpu_bytes'])} GB/GPU, KV cache {_gb(v['kv_cache_per_gpu_bytes'])} GB/GPU "
                      f"({v['concurrent_sequences']} sequences at once per engine)"]
    if plan.seconds:
        lines += ["", f"estimated step: {plan.step_seconds:.1f} s  (" + ", ".join(
            f"{k} {v:.2f}" for k, v in plan.seconds.items() if v) + ")"]
    lines.append("assumed: " + ", ".join(f"{k} {v}" for k, v in assumptions.items()))
    lines.append("fits" if plan.fits else "does NOT fit: " + "; ".join(plan.reasons))
    return "\n".join(lines)


def format_search(plans: list[Plan], tried: int, *, top: int, assumptions: dict, checkpoint: dict | None = None
                  ) -> str:
    if not plans:
        return f"no layout of the {tried} tried fits; assumed: " + ", ".join(f"{k} {v}" for k, v in assumptions.items())
    header = f"{'#':>2}  {'layout':<42} {'DP':>3} {'peak GB/GPU':>11} {'step s':>8}"
    lines = [f"{len(plans)} of {tried} layouts fit; fastest first", header]
    for i, plan in enumerate(plans[:top], 1):
        saved = "  (the checkpoint's layout)" if _is_saved(plan, checkpoint) else ""
        lines.append(f"{i:>2}  {plan.layout.label():<42} {plan.data_parallel_size:>3} {_gb(plan.peak_bytes):>11} "
                     f"{plan.step_seconds:>8.2f}{saved}")
    lines += ["", "best:", format_plan(plans[0], assumptions=assumptions)]
    return "\n".join(lines)
