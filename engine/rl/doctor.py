"""The mismatch doctor's diagnosis: where, layer by layer, the trainer and a rollout engine holding
the same weights stop computing the same thing on the same tokens.

Both sides record, per sequence (``engine.runtime.layer_probe`` for Megatron,
``engine.ray.vllm_probe`` for vLLM): ``embedding``, ``layer.i`` (the residual stream after decoder
layer ``i``), ``final_norm``, per MoE layer ``router.i`` (router logits; the trainer also
``routing.i``, the experts it chose) and ``log_probs`` of tokens 2... ``diagnose`` compares them:

* per row (embedding, each layer, final norm): the largest absolute difference over every token
  and hidden unit, ``max_abs_diff``; the largest absolute value of the trainer's hidden states
  there, ``scale``; their ratio ``rel_diff`` (activations grow with depth, so absolute differences
  of two layers do not compare) and the token where the difference is largest.
* **the first jump**: the first row, in forward order, whose ``rel_diff`` exceeds ``jump_factor``
  (default 10) times the largest ``rel_diff`` of every row before it, and ``jump_factor`` times
  the noise floor of the dtype (``8 x`` its machine epsilon: fp32 ~1e-6, bf16 ~0.06), whichever is
  larger. Rounding noise grows gradually through the layers; a layer whose weights differ adds a
  difference of its own at once. The floor keeps rounding noise of the first rows (after an
  exact embedding lookup) from counting as a jump.
* MoE: per layer the tokens whose set of experts differs (the trainer's routing map against the
  top-k of the engine's router logits), the first layer with any, and those tokens; and the
  largest router-logit difference per layer.
* the final log-prob difference (max and mean over the tokens; the worst token).

``DoctorConfig`` holds the flags (``--doctor_every`` in the RL job); ``write_report`` puts the
JSON under ``<run_dir>/doctor/step_N.json``; ``format_table`` is the console table.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Protocol

import torch

from engine.rl.config import DoctorConfig  # noqa: F401  (declared apart: the parsers import no torch)

# Machine epsilon per dtype name: the noise floor of a comparison is NOISE_EPS_MULTIPLE x the
# coarser side's epsilon.
DTYPE_EPS = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
NOISE_EPS_MULTIPLE = 8
MAX_LISTED_TOKENS = 32  # routing mismatches listed per report (all are counted)


class MismatchDoctor(Protocol):
    """What the RL loop is handed (``engine.ray.doctor.RayDoctor``)."""

    config: DoctorConfig

    def due(self, step: int) -> bool: ...

    def run(self, step: int, sequences: list[list[int]]) -> dict[str, float]:
        """Diagnose ``sequences`` (token ids) now; writes the report, returns metrics of the step."""


# ----- the diagnosis ---------------------------------------------------------------------------
def noise_floor(*dtypes: str) -> float:
    """``NOISE_EPS_MULTIPLE`` x the machine epsilon of the coarsest of ``dtypes``."""
    unknown = [d for d in dtypes if d not in DTYPE_EPS]
    if unknown:
        raise ValueError(f"mismatch doctor: unknown dtype {unknown[0]!r}; known: {', '.join(DTYPE_EPS)}")
    return NOISE_EPS_MULTIPLE * max(DTYPE_EPS[d] for d in dtypes)


def _row_order(name: str) -> tuple[int, int]:
    if name == "embedding":
        return (0, 0)
    if name == "final_norm":
        return (2, 0)
    return (1, int(name.split(".")[1]))


def _hidden_rows(actor: dict, engine: dict) -> list[str]:
    names = [n for n in actor if n == "embedding" or n == "final_norm" or re.fullmatch(r"layer\.\d+", n)]
    return sorted((n for n in names if n in engine), key=_row_order)


def _token_at(flat_index: int, lengths: list[int]) -> dict:
    """``{"sequence", "position"}`` of a token in the sequences laid end to end."""
    for sequence, length in enumerate(lengths):
        if flat_index < length:
            return {"sequence": sequence, "position": flat_index}
        flat_index -= length
    raise IndexError(flat_index)


def _joined(records: list[dict], name: str) -> torch.Tensor:
    return torch.cat([r[name] for r in records])


def _hidden_row(name: str, actor: torch.Tensor, engine: torch.Tensor, lengths: list[int]) -> dict:
    diff = (actor - engine).abs()
    per_token = diff.reshape(diff.shape[0], -1).amax(dim=1)
    max_abs = float(per_token.max())
    scale = float(actor.abs().max())
    return {"name": name, "max_abs_diff": max_abs, "scale": scale, "rel_diff": max_abs / scale if scale > 0 else max_abs,
            "worst_token": _token_at(int(per_token.argmax()), lengths)}


def first_jump(rows: list[dict], *, jump_factor: float, floor: float) -> dict | None:
    """The first row whose ``rel_diff`` exceeds ``jump_factor`` x max(floor, every earlier row's)."""
    before = 0.0
    for row in rows:
        baseline = max(floor, before)
        if row["rel_diff"] > jump_factor * baseline:
            return {"name": row["name"], "rel_diff": row["rel_diff"], "baseline": baseline,
                    "ratio": row["rel_diff"] / baseline}
        before = max(before, row["rel_diff"])
    return None


def _experts(mask_or_logits: torch.Tensor, top_k: int, *, is_mask: bool) -> list[tuple[int, ...]]:
    if is_mask:
        return [tuple(torch.nonzero(row).flatten().tolist()) for row in mask_or_logits > 0.5]
    return [tuple(sorted(row)) for row in mask_or_logits.topk(top_k, dim=-1).indices.tolist()]


def _routing(actor: list[dict], engine: list[dict], sequences: list[list[int]]) -> tuple[dict, dict]:
    """Per MoE layer index: ``{"mismatched_tokens", "router_logit_max_diff"}``; and the summary."""
    lengths = [len(s) for s in sequences]
    flat_ids = [t for s in sequences for t in s]
    layers = sorted(int(n.split(".")[1]) for n in actor[0] if n.startswith("routing.") and f"router.{n[8:]}" in engine[0])
    per_layer, first = {}, None
    for index in layers:
        chosen = _joined(actor, f"routing.{index}")
        top_k = int(chosen[0].sum().round())
        mine = _experts(chosen, top_k, is_mask=True)
        theirs = _experts(_joined(engine, f"router.{index}"), top_k, is_mask=False)
        differing = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
        logit_diff = float((_joined(actor, f"router.{index}") - _joined(engine, f"router.{index}")).abs().max())
        per_layer[index] = {"mismatched_tokens": len(differing), "router_logit_max_diff": logit_diff}
        if differing and first is None:
            first = {"layer": index, "num_tokens": len(differing), "tokens": [
                {**_token_at(i, lengths), "token_id": flat_ids[i], "actor_experts": list(mine[i]),
                 "engine_experts": list(theirs[i])} for i in differing[:MAX_LISTED_TOKENS]]}
    total = sum(row["mismatched_tokens"] for row in per_layer.values())
    return per_layer, {"num_moe_layers": len(layers), "mismatched_tokens": total,
                       "tokens_per_layer": sum(lengths), "first_layer": first}


def _log_probs(actor: list[dict], engine: list[dict], sequences: list[list[int]]) -> dict:
    a, e = _joined(actor, "log_probs"), _joined(engine, "log_probs")
    diff = (a - e).abs()
    worst = int(diff.argmax())
    where = _token_at(worst, [len(s) - 1 for s in sequences])
    where["position"] += 1  # log_probs start at each sequence's second token
    where["token_id"] = sequences[where["sequence"]][where["position"]]
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "worst_token": where}


def diagnose(actor: list[dict], engine: list[dict], sequences: list[list[int]], *, jump_factor: float = 10.0) -> dict:
    """The report (a JSON-able dict) of one comparison; ``actor`` / ``engine``: per sequence records
    (tensors by name, and ``dtype``: the name of the dtype the side computes in)."""
    if not sequences or any(len(s) < 2 for s in sequences):
        raise ValueError("mismatch doctor: every sequence needs at least two tokens")
    dtypes = (actor[0]["dtype"], engine[0]["dtype"])
    actor_names = {n for n in actor[0] if n not in ("log_probs", "dtype") and not n.startswith("routing.")}
    missing = sorted(actor_names ^ (set(engine[0]) - {"log_probs", "dtype"}))
    lengths = [len(s) for s in sequences]
    rows = [_hidden_row(name, _joined(actor, name), _joined(engine, name), lengths)
            for name in _hidden_rows(actor[0], engine[0])]
    floor = noise_floor(*dtypes)
    routing_rows, routing = _routing(actor, engine, sequences)
    for row in rows:
        if row["name"].startswith("layer.") and int(row["name"][6:]) in routing_rows:
            row.update(routing_rows[int(row["name"][6:])])
    return {
        "num_sequences": len(sequences), "num_tokens": sum(lengths), "dtypes": list(dtypes),
        "jump_factor": jump_factor, "noise_floor": floor, "rows": rows,
        "first_jump": first_jump(rows, jump_factor=jump_factor, floor=floor),
        "routing": routing, "log_probs": _log_probs(actor, engine, sequences), "unmatched_records": missing,
    }


def report_metrics(report: dict) -> dict[str, float]:
    """The numbers of a report the RL loop logs with the step (``doctor/first_jump_layer`` only when
    a row jumps: the layer index, -1 for the embedding, the number of layers for the final norm)."""
    jump = report["first_jump"]
    first_routing = report["routing"]["first_layer"]
    metrics = {
        "doctor/max_rel_diff": max((r["rel_diff"] for r in report["rows"]), default=0.0),
        "doctor/jump": float(jump is not None),
        "doctor/logprob_max_abs_diff": report["log_probs"]["max_abs_diff"],
        "doctor/routing_mismatched_tokens": float(report["routing"]["mismatched_tokens"]),
    }
    if jump is not None:
        layers = [r["name"] for r in report["rows"] if r["name"].startswith("layer.")]
        metrics["doctor/first_jump_layer"] = float({"embedding": -1, "final_norm": len(layers)}.get(
            jump["name"], int(jump["name"].split(".")[-1]) if "." in jump["name"] else -1))
    if first_routing is not None:
        metrics["doctor/first_routing_layer"] = float(first_routing["layer"])
    return metrics


# ----- output --------------------------------------------------------------------------------------
def write_report(report: dict, run_dir: str | os.PathLike, step: int) -> Path:
    """``<run_dir>/doctor/step_<step>.json``, written whole (temporary file, then rename)."""
    directory = Path(run_dir) / "doctor"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"step": step, **report}, indent=1))
    os.replace(tmp, path)
    return path


def _fmt(value: float) -> str:
    return f"{value:.3e}" if math.isfinite(value) else str(value)


def format_table(report: dict) -> str:
    """The report as aligned plain text: one row per layer, then the verdicts."""
    jump = report["first_jump"]
    header = ("layer", "max |diff|", "scale", "rel diff", "routing diffs", "")
    lines = [header]
    for row in report["rows"]:
        routing = (f"{row['mismatched_tokens']}/{report['num_tokens']}" if "mismatched_tokens" in row else "")
        mark = "<- first jump" if jump and jump["name"] == row["name"] else ""
        lines.append((row["name"], _fmt(row["max_abs_diff"]), _fmt(row["scale"]), _fmt(row["rel_diff"]), routing, mark))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.append(_jump_verdict(report))
    text.append(_routing_verdict(report["routing"]))
    lp = report["log_probs"]
    worst = lp["worst_token"]
    text.append(f"log-probs: max |diff| {_fmt(lp['max_abs_diff'])}, mean {_fmt(lp['mean_abs_diff'])} (worst: "
                f"sequence {worst['sequence']} position {worst['position']}, token {worst['token_id']})")
    if report["unmatched_records"]:
        text.append(f"recorded on one side only: {', '.join(report['unmatched_records'])}")
    return "\n".join(text)


def _jump_verdict(report: dict) -> str:
    jump = report["first_jump"]
    if jump is None:
        return (f"no jump: no layer's relative difference exceeds {report['jump_factor']:g}x the layers before it "
                f"(noise floor {_fmt(report['noise_floor'])}, {'/'.join(report['dtypes'])})")
    return (f"first jump: {jump['name']} (relative difference {_fmt(jump['rel_diff'])}, {jump['ratio']:.3g}x "
            f"the largest before it or the noise floor, {_fmt(jump['baseline'])})")


def _routing_verdict(routing: dict) -> str:
    if not routing["num_moe_layers"]:
        return "routing: dense model"
    first = routing["first_layer"]
    if first is None:
        return f"routing: identical in all {routing['num_moe_layers']} MoE layers"
    tokens = ", ".join(f"seq {t['sequence']} pos {t['position']} (id {t['token_id']}): actor {t['actor_experts']} "
                       f"engine {t['engine_experts']}" for t in first["tokens"][:4])
    return (f"routing: first differs at layer {first['layer']} ({first['num_tokens']} token(s): {tokens}"
            f"{' ...' if first['num_tokens'] > 4 else ''}); {routing['mismatched_tokens']} token-layer "
            "mismatches in all")
