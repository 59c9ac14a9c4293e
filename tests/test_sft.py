"""SFT on the Megatron engine: layouts agree, packing is exact, resume is exact, a task is learnt."""
from __future__ import annotations

import shutil

import pytest

from tests.dist_harness import run_distributed

NUM_STEPS = 5
LOSS_TOLERANCE = 2e-4  # relative; fp32 reductions differ in order between layouts


@pytest.fixture(scope="module")
def arithmetic_data(tmp_path_factory) -> str:
    from engine.tasks.arithmetic import make_rows, write_jsonl

    directory = tmp_path_factory.mktemp("sft_data")
    write_jsonl(make_rows(256, max_operand=9, seed=0), directory / "train.jsonl")
    write_jsonl(make_rows(32, max_operand=9, seed=1), directory / "test.jsonl")
    return str(directory)


def _train(rank, world_size, model_path, data_dir, layout, loop, checkpoint=None, packing=False, lr=1e-3, build=None,
           max_tokens=None):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.sft import SFTDataset
    from engine.runtime.checkpoint import CheckpointConfig
    from engine.runtime.engine import EngineConfig
    from engine.runtime.optimizer import OptimConfig
    from engine.trainers.base import OfflineTrainerConfig, TrainLoopConfig
    from engine.trainers.sft import SFTTrainer
    from models.builder import ModelBuildConfig
    from parallel.config import ParallelConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = DataConfig(dataset=f"json@{data_dir}", input_key="prompt", output_key="answer", max_len=32)
    train_set = SFTDataset.from_config(data, tokenizer, split="train")
    eval_set = SFTDataset.from_config(data, tokenizer, split="test")
    config = OfflineTrainerConfig(
        engine=EngineConfig(
            pretrain=model_path,
            parallel=ParallelConfig(**layout),
            optim=OptimConfig(learning_rate=lr, lr_warmup_ratio=0.1),
            build=ModelBuildConfig(**(build or {})),
        ),
        loop=TrainLoopConfig(**loop),
        checkpoint=CheckpointConfig(**(checkpoint or {})),
    )
    trainer = SFTTrainer(config, train_set, eval_set, pad_token_id=tokenizer.pad_token_id,
                         packing_samples=packing, max_len=32, max_tokens=max_tokens)
    trainer.train_dataset = _Recording(train_set)  # the sample indices this rank trains, in order
    history = trainer.fit()
    final_eval = trainer._evaluate(trainer.last_step)
    return {"loss": [h["loss"] for h in history], "grad_norm": [h["grad_norm"] for h in history],
            "aux_loss": [h.get("aux_loss") for h in history], "eval_loss": final_eval.get("loss"),
            "lr": [h["lr"] for h in history], "trained": trainer.train_dataset.taken,
            "micro_tokens": [int(b["cu_seqlens"][-1]) for b in trainer.step_microbatches()] if max_tokens else None}


class _Recording:
    """A training set that records which samples are read."""

    def __init__(self, samples):
        self.samples, self.taken = samples, []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        self.taken.append(index)
        return self.samples[index]


def _run(model_path, data_dir, layout, world_size, *, loop=None, checkpoint=None, packing=False, lr=1e-3,
         build=None, all_ranks=False, max_tokens=None):
    loop = loop or {"train_batch_size": 16, "micro_train_batch_size": 4, "max_steps": NUM_STEPS}
    results = run_distributed(
        _train, world_size, args=(model_path, data_dir, layout, loop, checkpoint, packing, lr, build, max_tokens),
        timeout=300,
    )
    return results if all_ranks else results[0]


def _assert_same_curve(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected), start=1):
        assert abs(a - e) <= LOSS_TOLERANCE * abs(e), f"step {step}: {a} vs {e}"


@pytest.fixture(scope="module")
def reference(tiny_models, arithmetic_data):
    return _run(tiny_models["llama"], arithmetic_data, {}, 1)


@pytest.mark.parametrize(
    "layout,world_size",
    [
        ({"tensor_model_parallel_size": 2}, 2),
        ({"pipeline_model_parallel_size": 2}, 2),
        ({}, 2),  # data parallel 2
        ({"context_parallel_size": 2}, 2),
        ({"tensor_model_parallel_size": 2, "context_parallel_size": 2}, 4),
    ],
    ids=["tp2", "pp2", "dp2", "cp2", "tp2_cp2"],
)
def test_loss_curve_matches_single_process(layout, world_size, reference, tiny_models, arithmetic_data):
    result = _run(tiny_models["llama"], arithmetic_data, layout, world_size)
    _assert_same_curve(result["loss"], reference["loss"])
    assert result["loss"][-1] < result["loss"][0]


def test_packed_batches_give_the_same_losses_and_gradients(reference, tiny_models, arithmetic_data):
    packed = _run(tiny_models["llama"], arithmetic_data, {}, 1, packing=True)
    _assert_same_curve(packed["loss"], reference["loss"])
    for a, e in zip(packed["grad_norm"], reference["grad_norm"]):
        assert abs(a - e) <= 1e-3 * e


def test_token_budget_batches_at_dp2_give_the_same_losses(reference, tiny_models, arithmetic_data):
    """--use_dynamic_batch_size --max_tokens_per_gpu 32: micro-batches packed up to 32 tokens, balanced over
    DP=2 by tokens, as many on each rank: the single-process fixed-micro-batch curve."""
    budget = _run(tiny_models["llama"], arithmetic_data, {}, 2, max_tokens=32, all_ranks=True)
    _assert_same_curve(budget[0]["loss"], reference["loss"])
    counts = [len(r["micro_tokens"]) for r in budget]
    assert counts[0] == counts[1] and max(t for r in budget for t in r["micro_tokens"]) <= 32


def test_packing_under_context_parallel(reference, tiny_models, arithmetic_data):
    packed = _run(tiny_models["llama"], arithmetic_data, {"context_parallel_size": 2}, 2, packing=True)
    _assert_same_curve(packed["loss"], reference["loss"])


def test_kill_and_resume_continues_the_same_curve(reference, tiny_models, arithmetic_data, tmp_path):
    ckpt = {"ckpt_path": str(tmp_path / "ckpt"), "save_steps": 1, "max_ckpt_num": 2}
    loop = {"train_batch_size": 16, "micro_train_batch_size": 4}
    # The "killed" run stops after step 3 (--max_steps stops without changing the LR schedule).
    first = _run(tiny_models["llama"], arithmetic_data, {"tensor_model_parallel_size": 2}, 2,
                 loop={**loop, "max_steps": 3}, checkpoint=ckpt)
    _assert_same_curve(first["loss"], reference["loss"][:3])
    kept = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert kept == ["global_step2", "global_step3"], kept  # --max_ckpt_num 2 rotates older ones out

    # Truncate the newest checkpoint: resume must detect it and fall back to step 2.
    shard = next((tmp_path / "ckpt" / "global_step3").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    resumed = _run(tiny_models["llama"], arithmetic_data, {"tensor_model_parallel_size": 2}, 2,
                   loop={**loop, "max_steps": NUM_STEPS}, checkpoint={**ckpt, "load_checkpoint": True})
    _assert_same_curve(resumed["loss"], reference["loss"][2:])


def test_tiny_model_learns_single_digit_addition(tiny_models, arithmetic_data):
    loop = {"train_batch_size": 32, "micro_train_batch_size": 8, "max_epochs": 8}
    result = _run(tiny_models["llama"], arithmetic_data, {}, 1, loop=loop, lr=3e-3)
    assert result["loss"][0] > 4.0
    # Response tokens are the sum's digits and eos: well below the ~ln(500) of guessing.
    assert result["eval_loss"] < 1.0, result["eval_loss"]


def test_bad_batch_sizes_name_the_flags():
    from engine.trainers.base import TrainLoopConfig

    with pytest.raises(ValueError, match="--micro_train_batch_size"):
        TrainLoopConfig(micro_train_batch_size=0)


def test_moe_run_resumes_under_another_layout(tiny_models, arithmetic_data, tmp_path):
    """A Mixtral run with the aux loss saved at EP=2 goes on at EP=1 exactly as if never stopped
    (router and experts in the checkpoint, resharded on load)."""
    path, build = tiny_models["mixtral"], {"aux_loss_coef": 0.05}
    ckpt = {"ckpt_path": str(tmp_path / "ckpt"), "save_steps": 1}
    loop = {"train_batch_size": 16, "micro_train_batch_size": 4}
    whole = _run(path, arithmetic_data, {}, 1, build=build)
    first = _run(path, arithmetic_data, {"expert_model_parallel_size": 2}, 2, loop={**loop, "max_steps": 3},
                 checkpoint=ckpt, build=build)
    _assert_same_curve(first["loss"], whole["loss"][:3])
    resumed = _run(path, arithmetic_data, {}, 1, loop={**loop, "max_steps": NUM_STEPS},
                   checkpoint={**ckpt, "load_checkpoint": True}, build=build)
    _assert_same_curve(resumed["loss"], whole["loss"][3:])
    _assert_same_curve(resumed["aux_loss"], whole["aux_loss"][3:])


def test_resume_with_doubled_batch_size_trains_every_sample_once(tiny_models, arithmetic_data, tmp_path):
    """Checkpointed after 2 steps of 16, resumed with --train_batch_size 32 (DP=2): the epoch's 256
    samples are each trained exactly once (read by one rank, once), and the LR follows the plan of
    the samples trained (the schedule re-planned for steps of 32): the resumed steps' LR is the
    whole run's after as many samples. (Before, the resume started at sample 2 x 32 and left 32
    samples untrained.)"""
    ckpt = {"ckpt_path": str(tmp_path / "ckpt"), "save_steps": 2, "max_ckpt_num": 8}
    whole = _run(tiny_models["llama"], arithmetic_data, {}, 2, checkpoint=ckpt, all_ranks=True,
                 loop={"train_batch_size": 16, "micro_train_batch_size": 4, "max_epochs": 1})
    for later in (tmp_path / "ckpt").iterdir():
        if later.name != "global_step2":
            shutil.rmtree(later)
    resumed = _run(tiny_models["llama"], arithmetic_data, {}, 2, checkpoint={**ckpt, "load_checkpoint": True},
                   loop={"train_batch_size": 32, "micro_train_batch_size": 4, "max_epochs": 1}, all_ranks=True)
    per_rank = 16 // 2 * 2  # the first run's two steps, each rank's half of each
    trained = [i for rank in whole for i in rank["trained"][:per_rank]] + [i for rank in resumed for i in rank["trained"]]
    assert len(resumed[0]["lr"]) == 7  # 224 samples left: 7 steps of 32
    assert sorted(trained) == list(range(256))  # every sample once: none skipped, none repeated
    # Resumed step k has trained 32 + 32 k samples, as the whole run after its step 2 + 2 k.
    assert resumed[0]["lr"] == pytest.approx(whole[0]["lr"][3::2], rel=1e-9)
