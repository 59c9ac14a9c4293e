"""Where a run is in its training data, counted in samples, and the learning-rate plan in samples:
what a checkpoint stores so that a resume continues at the next unconsumed sample whatever the
batch size of either run.

Every epoch has one global order of the (mixed) training set's samples; a global batch of ``B``
takes the next ``B`` of them. A tail shorter than the batch is not trained: the next batch starts
the next epoch. A resume under another batch size continues the same order from the next
unconsumed sample and re-plans the remaining steps (and the LR schedule) for the samples left.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(kw_only=True)
class DataPosition:
    """The next unconsumed sample: ``consumed_in_epoch`` samples of epoch ``epoch``'s order are
    trained (``consumed`` over all epochs) of a training set of ``num_samples``."""

    num_samples: int
    epoch: int = 0
    consumed_in_epoch: int = 0
    consumed: int = 0

    def next_batch(self, batch_size: int) -> tuple[int, int]:
        """(epoch, first index into that epoch's order) of the next global batch of ``batch_size``."""
        if self.num_samples - self.consumed_in_epoch < batch_size:
            return self.epoch + 1, 0
        return self.epoch, self.consumed_in_epoch

    def advance(self, batch_size: int) -> None:
        self.epoch, begin = self.next_batch(batch_size)
        self.consumed_in_epoch = begin + batch_size
        self.consumed += batch_size

    def remaining_steps(self, batch_size: int, max_epochs: int) -> int:
        """Global batches of ``batch_size`` left until the end of epoch ``max_epochs - 1``."""
        if self.epoch >= max_epochs:
            return 0
        this_epoch = (self.num_samples - self.consumed_in_epoch) // batch_size
        return this_epoch + (max_epochs - self.epoch - 1) * (self.num_samples // batch_size)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def restore(cls, state: dict, *, num_samples: int) -> DataPosition:
        """The saved position, refused (ValueError with the reason) for another training set: its
        sample indices would not name the same samples."""
        if state["num_samples"] != num_samples:
            raise ValueError(
                f"the checkpoint was trained on a training set of {state['num_samples']} samples, this run's has "
                f"{num_samples} (--dataset / --dataset_probs / --max_samples / --train_split changed?): the "
                "data position cannot be resumed exactly; resume with the same data, or start without --load_checkpoint"
            )
        return cls(**state)


@dataclass(kw_only=True)
class SchedulePlan:
    """The LR schedule in samples: warmup up to ``warmup_samples``, decay until ``decay_samples``;
    ``train_batch_size`` samples per optimizer step. (The scheduler itself counts steps.)"""

    train_batch_size: int
    warmup_samples: int
    decay_samples: int

    @classmethod
    def fresh(cls, *, train_batch_size: int, warmup_steps: int, decay_steps: int) -> SchedulePlan:
        return cls(train_batch_size=train_batch_size, warmup_samples=warmup_steps * train_batch_size,
                   decay_samples=decay_steps * train_batch_size)

    def replanned(self, *, train_batch_size: int, planned_samples: int) -> SchedulePlan:
        """The same warmup (in samples), decay to the end of the ``planned_samples`` the run now
        trains (at least one step past the warmup, as a fresh plan)."""
        return SchedulePlan(train_batch_size=train_batch_size, warmup_samples=self.warmup_samples,
                            decay_samples=max(planned_samples, self.warmup_samples + train_batch_size))

    def state_dict(self) -> dict:
        return asdict(self)


def prompt_position(*, step: int, num_prompts: int, rollout_batch_size: int, generation_batches: int | None = None
                    ) -> dict:
    """What an RL checkpoint stores of its prompts after rollout ``step``. ``generation_batches``: the
    batches of ``rollout_batch_size`` prompts drawn so far (more than ``step`` when --dynamic_filtering
    refilled rollouts with more prompts; default ``step``, one batch per rollout)."""
    batches = step if generation_batches is None else generation_batches
    return {"num_prompts": num_prompts, "rollout_batch_size": rollout_batch_size,
            "consumed": batches * rollout_batch_size}


def resumed_generation_batches(saved: dict | None, *, step: int) -> int:
    """The batches of prompts a resumed RL run has drawn: the checkpoint's consumed prompts (a checkpoint
    from before positions were stored drew one batch per rollout)."""
    if saved is None:
        return step
    return saved["consumed"] // saved["rollout_batch_size"]


def check_prompt_position(saved: dict | None, *, num_prompts: int, rollout_batch_size: int) -> None:
    """Refuse (ValueError with the reason) a resume whose rollouts would not continue at the next
    unconsumed prompt: an RL run's rollout index orders its prompts, seeds its sampling, draws its
    --pretrain_data samples and plans the actor's LR schedule, so another --rollout_batch_size or
    another prompt set cannot continue it exactly. ``saved`` None: a checkpoint from before
    positions were stored (it is trusted, as it was then)."""
    if saved is None:
        return
    if saved["num_prompts"] != num_prompts:
        raise ValueError(
            f"the checkpoint's run had {saved['num_prompts']} prompts, this one has {num_prompts} (--prompt_data / "
            "--prompt_data_probs / --max_samples changed?): its prompt position cannot be resumed exactly; resume "
            "with the same prompts, or start without --load_checkpoint")
    if saved["rollout_batch_size"] != rollout_batch_size:
        raise ValueError(
            f"--rollout_batch_size {rollout_batch_size} differs from the checkpoint's run "
            f"({saved['rollout_batch_size']}, {saved['consumed']} prompts consumed): an RL run's rollout index orders "
            "its prompts, seeds its sampling and plans the actor's LR schedule, so a resume cannot continue at the "
            f"next unconsumed prompt exactly; resume with --rollout_batch_size {saved['rollout_batch_size']}")
