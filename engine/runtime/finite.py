"""Non-finite values never reach the weights: the checks the engine runs around an optimizer step and
before every checkpoint or export.

Every check ends in one collective over the role's whole world (TP x PP x CP x EP x DP: the default
group), so all ranks take the same decision: no rank steps, or writes, alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps skipped for a non-finite loss or gradient norm."""


class NonFiniteWeightsError(RuntimeError):
    """A checkpoint or export was refused: a parameter holds NaN or inf."""


def _is_finite(tensor: torch.Tensor) -> bool:
    """One reduction, no tensor-sized temporary: the max-norm is NaN or inf exactly when an element is.
    Integer tensors (QLoRA's packed NF4 weights) are finite by construction."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(torch.linalg.vector_norm(tensor.detach(), float("inf"))))


def any_rank(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over every rank of the world (collective)."""
    local = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return [bool(v) for v in local.tolist()]


def grads_are_finite(ddp_model) -> bool:
    """This rank's gradients (Megatron DDP's contiguous grad buffers, which the optimizer reads) finite."""
    grads = [b.grad_data for b in ddp_model.buffers + ddp_model.expert_parallel_buffers if b.grad_data.numel()]
    if not grads:
        return True
    # One max-norm per buffer (NaN or inf exactly when an element is), one device sync for all.
    return bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g, float("inf")).float() for g in grads])).all())


class LossWatch:
    """Wraps a loss function to note whether any micro-batch's loss was non-finite (last stage only)."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.bad = torch.zeros((), dtype=torch.bool)

    def __call__(self, output, batch):
        loss, *rest = self.loss_fn(output, batch)
        # Accumulated as a tensor: no device sync per micro-batch.
        self.bad = self.bad.to(loss.device) | ~torch.isfinite(loss.detach()).all()
        return (loss, *rest)


def step_skip_cause(loss_watch: LossWatch, ddp_model) -> str | None:
    """Why this step must not update the weights ("loss", "grad norm", both), agreed by every rank;
    None when it may. The grad norm is non-finite when a gradient element is (finite elements whose
    norm overflows are left to clipping, whose coefficient then zeroes the update)."""
    loss_bad, grads_bad = any_rank([bool(loss_watch.bad), not grads_are_finite(ddp_model)])
    causes = [name for name, bad in (("loss", loss_bad), ("grad norm", grads_bad)) if bad]
    return " and ".join(causes) or None


@dataclass
class SkippedSteps:
    """Counts optimizer steps skipped for non-finite values; stops the run after ``max_consecutive``
    in a row (0: never)."""

    max_consecutive: int
    total: int = 0
    consecutive: int = 0
    attempted: int = 0
    causes: list[str] = field(default_factory=list)

    def record(self, cause: str | None) -> None:
        self.attempted += 1
        if cause is None:
            self.consecutive = 0
            self.causes.clear()
            return
        self.total += 1
        self.consecutive += 1
        self.causes.append(f"step {self.attempted}: {cause}")
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.consecutive} consecutive optimizer steps skipped for a non-finite loss or grad norm "
                f"(--max_skipped_steps {self.max_consecutive}); the weights are those of before the first of "
                f"them. Non-finite: {'; '.join(self.causes)} (steps counted from this process's start or "
                "resume). Check the data, the rewards and --learning_rate")

    def message(self, cause: str) -> str:
        limit = f"of --max_skipped_steps {self.max_consecutive}" if self.max_consecutive else "(no limit)"
        return (f"warning: optimizer step {self.attempted} skipped: non-finite {cause} (grads zeroed, weights "
                f"unchanged); {self.consecutive} in a row {limit}, {self.total} in all")


def check_finite_weights(models: dict, *, what: str) -> None:
    """Refuse (on every rank) to write ``what`` when a parameter of ``models`` ({label: module}) is
    non-finite; the error names the parameter and the rank holding it. Collective."""
    local = next((f"{label}{name}" for label, model in models.items() if model is not None
                  for name, param in model.named_parameters() if not _is_finite(param)), None)
    if not any_rank([local is not None])[0]:
        return
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, local)
    where = "; ".join(f"{name} (rank {rank})" for rank, name in enumerate(found) if name is not None)
    raise NonFiniteWeightsError(f"refusing to write {what}: non-finite values (NaN or inf) in {where}. Nothing "
                                "was written and no older checkpoint was removed")

