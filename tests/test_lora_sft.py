"""LoRA SFT on the Megatron engine: TP=2 trains the same curve as one process, only the adapters
train (the base stays bit-identical, the optimizer and the checkpoints hold nothing else), a run
resumes exactly under another layout, and the exported PEFT adapter gives our model's logits."""
from __future__ import annotations

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.test_sft import LOSS_TOLERANCE, _assert_same_curve, arithmetic_data  # noqa: F401 - fixture

NUM_STEPS = 5
LORA = {"lora_rank": 8, "lora_alpha": 16, "target_modules": ("all-linear",)}


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(5, vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


def _train(rank, world_size, model_path, data_dir, layout, loop, checkpoint, save_path, lora=None):
    from transformers import AutoTokenizer

    from engine.data.config import DataConfig
    from engine.data.sft import SFTDataset
    from engine.runtime.checkpoint import CheckpointConfig
    from engine.runtime.engine import EngineConfig
    from engine.runtime.optimizer import OptimConfig
    from engine.runtime.schedule import forward_logits
    from engine.trainers.base import OfflineTrainerConfig, TrainLoopConfig
    from engine.trainers.sft import SFTTrainer
    from models.builder import ModelBuildConfig
    from models.lora import LoraConfig, is_lora_name
    from parallel.config import ParallelConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = DataConfig(dataset=f"json@{data_dir}", input_key="prompt", output_key="answer", max_len=32)
    train_set = SFTDataset.from_config(data, tokenizer, split="train")
    config = OfflineTrainerConfig(
        engine=EngineConfig(pretrain=model_path, parallel=ParallelConfig(**layout),
                            optim=OptimConfig(learning_rate=1e-2, lr_warmup_ratio=0.1),
                            build=ModelBuildConfig(lora=LoraConfig(**(lora or LORA)))),
        loop=TrainLoopConfig(**loop, save_path=save_path),
        checkpoint=CheckpointConfig(**(checkpoint or {})),
    )
    trainer = SFTTrainer(config, train_set, None, pad_token_id=tokenizer.pad_token_id, max_len=32)
    model = trainer.engine.model
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not is_lora_name(n)}
    history = trainer.fit()
    ddp = trainer.engine.ddp_model
    in_ddp = {id(p) for buffer in ddp.buffers + ddp.expert_parallel_buffers for p in buffer.params}
    inner = getattr(trainer.engine.optimizer, "chained_optimizers", [trainer.engine.optimizer])
    state_numel = sum(t.numel() for opt in inner for s in opt.optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)
    ids = _ids(trainer.engine.vocab_size)
    model.eval()
    logits = forward_logits(model, [{"input_ids": ids, "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}],
                            vocab_size=trainer.engine.vocab_size)
    return {
        "loss": [h["loss"] for h in history],
        "base_unchanged": all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before),
        "trained": sorted(n for n, p in model.named_parameters() if id(p) in in_ddp),
        "lora_numel": sum(p.numel() for n, p in model.named_parameters() if is_lora_name(n)),
        "adam_state_numel": state_numel,
        "logits": logits[0] if logits is not None else None,
        "quantized": trainer.engine.quantized,
    }


def _run(model_path, data_dir, layout, world_size, *, max_steps=NUM_STEPS, checkpoint=None, save_path=None,
         lora=None):
    loop = {"train_batch_size": 16, "micro_train_batch_size": 4, "max_steps": max_steps}
    return run_distributed(_train, world_size, args=(model_path, data_dir, layout, loop, checkpoint, save_path, lora),
                           timeout=300)[0]


@pytest.fixture(scope="module")
def single(tiny_models, arithmetic_data, tmp_path_factory):  # noqa: F811 - the fixture imported above
    save_path = tmp_path_factory.mktemp("lora_sft") / "adapter"
    return _run(tiny_models["llama"], arithmetic_data, {}, 1, save_path=str(save_path)), save_path


def test_only_adapters_train(single):
    result, _ = single
    assert result["base_unchanged"]
    assert result["trained"] and all(".lora." in name for name in result["trained"])
    assert result["adam_state_numel"] == 2 * result["lora_numel"]  # exp_avg and exp_avg_sq of the adapters only
    assert result["loss"][-1] < result["loss"][0]


@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2, "sequence_parallel": True}, {},
                                    {"context_parallel_size": 2}], ids=["tp2_sp", "dp2", "cp2"])
def test_layouts_train_the_same_curve(layout, single, tiny_models, arithmetic_data):  # noqa: F811
    result = _run(tiny_models["llama"], arithmetic_data, layout, 2)
    _assert_same_curve(result["loss"], single[0]["loss"])
    assert result["base_unchanged"]


def test_exported_adapter_gives_our_logits(single, tiny_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, save_path = single
    assert sorted(p.name for p in save_path.iterdir() if p.name.startswith("adapter")) == [
        "adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(save_path)).eval()
    with torch.no_grad():
        logits = model(_ids(base.config.vocab_size)).logits
    torch.testing.assert_close(result["logits"], logits, atol=1e-4, rtol=0)


def test_checkpoint_holds_the_adapters_and_resumes_under_another_layout(single, tiny_models, arithmetic_data,  # noqa: F811
                                                                         tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from models.sources import ModelSource

    ckpt = {"ckpt_path": str(tmp_path / "ckpt"), "save_steps": 1}
    first = _run(tiny_models["llama"], arithmetic_data, {"tensor_model_parallel_size": 2}, 2, max_steps=3,
                 checkpoint=ckpt)
    _assert_same_curve(first["loss"], single[0]["loss"][:3])
    step3 = tmp_path / "ckpt" / "global_step3"
    metadata = FileSystemReader(str(step3)).read_metadata().state_dict_metadata
    model_keys = [k for k in metadata if not k.startswith("optimizer")]
    assert model_keys and all(".lora." in key for key in model_keys), model_keys
    # Each adapter once, whole (gathered over TP): exactly the adapters' parameters, nothing of the base.
    assert sum(metadata[k].size.numel() for k in model_keys) == single[0]["lora_numel"]
    with pytest.raises(ValueError, match="LoRA training checkpoint"):
        ModelSource.open(step3)
    resumed = _run(tiny_models["llama"], arithmetic_data, {}, 1, checkpoint={**ckpt, "load_checkpoint": True})
    _assert_same_curve(resumed["loss"], single[0]["loss"][3:])
