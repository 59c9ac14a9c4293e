"""--async_save at DP=2 (two gloo ranks, the shared engine): the background checkpoint is the
synchronous one bit for bit although training changes the weights while it is written; it is
invisible until complete; a writer that fails mid-save leaves the previous checkpoint the newest,
and that one loads."""
from __future__ import annotations

import json

import torch

from tests.dist_harness import run_distributed
from tests.test_parallel_equivalence import _microbatches


def _weights(engine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters()}


def _run(rank, world_size, path, out_dir):
    from dataclasses import replace

    from megatron.core import tensor_parallel

    import models.mcore_async_save as async_save
    from engine.runtime.checkpoint import CheckpointConfig, latest_valid_checkpoint, step_directories
    from engine.runtime.engine import EngineConfig, TrainingEngine
    from engine.runtime.optimizer import OptimConfig
    from models.hf_checkpoint import CheckpointError

    engine = TrainingEngine(EngineConfig(pretrain=path, optim=OptimConfig(learning_rate=1e-2, lr_warmup_ratio=0.0)),
                            total_steps=8)
    batches = [{**b, "loss_mask": torch.ones_like(b["labels"])} for b in _microbatches(engine.vocab_size)]
    batches = batches[rank::world_size]
    scale = engine.loss_scale(batches)

    def loss_fn(logits, batch):
        loss_sum = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"]).sum()
        return loss_sum * scale, {"loss_sum": loss_sum.detach(), "num_tokens": batch["loss_mask"].sum()}

    def step():
        return engine.train_step(batches, loss_fn, normaliser_key="num_tokens").metrics

    sync = CheckpointConfig(ckpt_path=f"{out_dir}/sync")
    background = CheckpointConfig(ckpt_path=f"{out_dir}/async", async_save=True)
    out = {}
    step()
    engine.save_checkpoint(sync, 1, {"step": 1})
    saved_weights = _weights(engine)
    engine.save_checkpoint(background, 1, {"step": 1})
    out["visible_before_publish"] = [s for s, _ in step_directories(background.ckpt_path)]
    metrics = step()  # changes every weight while the writer may still run; publishes once all ranks are done
    while engine.checkpoint_writer.busy:
        metrics = step()
    out["writer_metrics"] = sorted(k for k in metrics if k.startswith("checkpoint/"))
    out["visible_after_publish"] = [s for s, _ in step_directories(background.ckpt_path)]
    # The next background save fails in its writer (the disk "dies" after the tensor files).
    def broken_checksum(path):
        raise OSError(f"injected: the disk died writing {path}")

    original, async_save.file_checksum = async_save.file_checksum, broken_checksum
    try:
        engine.save_checkpoint(background, 3, {"step": 3}, wait=True)
        out["failure"] = None
    except CheckpointError as exc:
        out["failure"] = str(exc)
    finally:
        async_save.file_checksum = original
    out["after_failure"] = [s for s, _ in step_directories(background.ckpt_path)]
    newest = latest_valid_checkpoint(background.ckpt_path, group=torch.distributed.group.WORLD)
    out["newest"] = newest.name
    out["resumed_step"] = engine.resume(replace(background, load_checkpoint=True))["step"]
    out["resumed_equal"] = all(torch.equal(p, saved_weights[n]) for n, p in engine.model.named_parameters())
    return out


def _index(path):
    import pickle

    index = pickle.loads(path.read_bytes())
    assert index.storage_meta.checkpoint_id.startswith(str(path.parent) + ".partial-")
    index.storage_meta = None
    return index


def test_async_checkpoint_is_the_sync_one_and_a_failed_write_keeps_the_previous(tiny_models, tmp_path):
    results = run_distributed(_run, 2, args=(tiny_models["llama"], str(tmp_path)), timeout=300)
    for out in results:
        assert out["visible_before_publish"] == []  # nothing visible until complete
        assert out["visible_after_publish"] == [1]
        assert out["writer_metrics"] == ["checkpoint/publish_s", "checkpoint/snapshot_s", "checkpoint/write_s"]
        assert "injected: the disk died" in out["failure"] and "previous checkpoint remains the newest" in out["failure"]
        assert out["after_failure"] == [1] and out["newest"] == "global_step1"
        assert out["resumed_step"] == 1 and out["resumed_equal"]
    # Bit for bit: every file of the background checkpoint equals the synchronous one's.
    sync, background = tmp_path / "sync" / "global_step1", tmp_path / "async" / "global_step1"
    files = sorted(str(p.relative_to(sync)) for p in sync.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(background)) for p in background.rglob("*") if p.is_file())
    assert len(files) > 5
    for name in files:
        if name in (".metadata", "manifest.json"):
            continue
        assert (sync / name).read_bytes() == (background / name).read_bytes(), name
    # torch.distributed.checkpoint's index differs only in its storage_meta: the staging path it was
    # written to and a random save id (two synchronous saves differ there too).
    sync_index, background_index = (_index(d / ".metadata") for d in (sync, background))
    assert sync_index == background_index
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (sync, background)]
    for manifest in manifests:  # every file but the index, by size and checksum
        manifest["files"].pop(".metadata")
        manifest["checksums"].pop(".metadata")
    assert manifests[0] == manifests[1]
    # The failed save stayed in its staging directory, which no resume picks.
    assert [p.name for p in (tmp_path / "async").iterdir() if p.name.startswith("global_step3.partial")]
