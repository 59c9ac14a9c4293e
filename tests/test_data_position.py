"""The data position in samples (``engine.data.position``): batches of any size continue the
epoch's order at the next unconsumed sample; resumes that cannot be exact are refused, named."""
from __future__ import annotations

import pytest

from engine.data.position import DataPosition, SchedulePlan, check_prompt_position, prompt_position


def _take(position: DataPosition, batch_size: int, steps: int) -> list[tuple[int, int]]:
    taken = []
    for _ in range(steps):
        taken.append(position.next_batch(batch_size))
        position.advance(batch_size)
    return taken


def test_a_batch_size_change_continues_at_the_next_sample_and_drops_only_the_tail():
    position = DataPosition(num_samples=100)
    assert _take(position, 16, 2) == [(0, 0), (0, 16)]
    assert position.remaining_steps(32, max_epochs=2) == 2 + 3  # 68 left of epoch 0 (a tail of 4), 3 of epoch 1
    assert _take(position, 32, 3) == [(0, 32), (0, 64), (1, 0)]
    assert (position.epoch, position.consumed_in_epoch, position.consumed) == (1, 32, 128)


def test_another_training_set_is_refused_with_the_reason():
    saved = DataPosition(num_samples=100, consumed_in_epoch=32, consumed=32).state_dict()
    assert DataPosition.restore(saved, num_samples=100).consumed == 32
    with pytest.raises(ValueError, match="100 samples, this run's has 90"):
        DataPosition.restore(saved, num_samples=90)


def test_a_replanned_schedule_keeps_the_warmup_and_ends_with_the_samples():
    plan = SchedulePlan.fresh(train_batch_size=16, warmup_steps=2, decay_steps=8)
    assert (plan.warmup_samples, plan.decay_samples) == (32, 128)
    replanned = plan.replanned(train_batch_size=32, planned_samples=32 + 3 * 32)
    assert (replanned.warmup_samples, replanned.decay_samples) == (32, 128)


def test_rl_resume_under_another_rollout_batch_size_is_refused_naming_the_flag():
    saved = prompt_position(step=3, num_prompts=64, rollout_batch_size=8)
    check_prompt_position(saved, num_prompts=64, rollout_batch_size=8)
    check_prompt_position(None, num_prompts=64, rollout_batch_size=16)  # an older checkpoint: trusted
    with pytest.raises(ValueError, match=r"--rollout_batch_size 16 differs .* \(8, 24 prompts consumed\)"):
        check_prompt_position(saved, num_prompts=64, rollout_batch_size=16)
    with pytest.raises(ValueError, match="had 64 prompts, this one has 48"):
        check_prompt_position(saved, num_prompts=48, rollout_batch_size=8)
