"""The mismatch doctor over Ray: the actor's Megatron ranks and a rollout engine run the same
tokens with the same (just synced) weights; ``engine.rl.doctor`` says where they part.

    doctor = RayDoctor(DoctorConfig(doctor_every=2), actor=actor_group, engines=rollouts, run_dir=run_dir)
    metrics = doctor.run(step, sequences)     # table on the console, <run_dir>/doctor/step_N.json

``engines`` is anything with ``probe_layers(sequences) -> per-sequence records`` of one engine:
``engine.ray.rollouts.EngineRollouts`` in the RL loop (it hands the GPU memory over as for a
generation), an ``EnginePool`` in ``engine.cli.doctor``.
"""
from __future__ import annotations

import os

from engine.rl.doctor import DoctorConfig, diagnose, format_table, report_metrics, write_report


class RayDoctor:
    """``engine.rl.doctor.MismatchDoctor`` over a Megatron ``RoleGroup`` and rollout engines."""

    def __init__(self, config: DoctorConfig, *, actor, engines, run_dir: str | os.PathLike | None,
                 max_tokens: int | None = None):
        """``max_tokens``: sequences are cut to this many tokens (the engine's ``max_model_len`` - 1: its
        probe is a prefill that samples one token, which must fit as well)."""
        self.max_tokens = max_tokens
        self.config = config
        self.actor = actor
        self.engines = engines
        self.run_dir = run_dir

    def due(self, step: int) -> bool:
        return self.config.due(step)

    def diagnose(self, sequences: list[list[int]]) -> dict:
        """The report of ``sequences``: the actor first (its weights are in place right after a sync;
        the engines may then take the GPU memory for their forward)."""
        sequences = [list(s[:self.max_tokens]) for s in sequences]
        actor = self.actor.probe_layers(sequences)
        engine = self.engines.probe_layers(sequences)
        return diagnose(actor, engine, sequences, jump_factor=self.config.doctor_jump_factor)

    def report(self, step: int, sequences: list[list[int]]) -> dict:
        """Diagnose ``sequences`` now: the table on the console, the JSON in the run directory."""
        report = self.diagnose(sequences)
        where = write_report(report, self.run_dir, step) if self.run_dir is not None else None
        print(f"mismatch doctor, rollout {step}: {report['num_sequences']} sequence(s), {report['num_tokens']} tokens"
              + (f" ({where})" if where else "") + "\n" + format_table(report), flush=True)
        return report

    def run(self, step: int, sequences: list[list[int]]) -> dict[str, float]:
        return report_metrics(self.report(step, sequences))
