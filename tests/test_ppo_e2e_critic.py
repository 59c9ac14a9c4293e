"""PPO with a critic, a reference and reward models end to end (tests/rl_harness.py: the task):
GAE under PP=2 (LoRA roles, the mismatch doctor, parked memory), the ptx loss exact under every
layout, rewards from a reward-model server.
"""
from __future__ import annotations

import pytest

from tests.rl_harness import MARGIN, ppo_args, rise


def test_gae_with_lora_actor_and_critic_under_pp2(rl_setup, ray_cluster):
    """LoRA on both trained roles: a PP=2 actor syncs merged weights from both stages, the critic trains
    its adapters and value head, and both park their (adapter-only) optimizer state while the engine generates.
    --doctor_every 3: after the syncs of rollouts 3, 6 and 9 the mismatch doctor compares the actor
    (each pipeline stage reporting its layers) with the engine layer by layer: fp32 noise, no jump."""
    import json

    from engine.cli import train_ppo_ray

    run_dir = rl_setup["root"] / "run_pp2_doctor"
    history = train_ppo_ray.main(ppo_args(
        rl_setup, "--advantage_estimator", "gae", "--init_kl_coef", "0.01", "--max_steps", "9",
        "--actor_num_gpus_per_node", "2", "--actor_pipeline_model_parallel_size", "2",
        "--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "2e-3", "--critic_learning_rate", "1e-3",
        "--megatron_enable_sleep", "--doctor_every", "3", "--run_dir", str(run_dir),
    ))
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4
    assert sorted(p.name for p in (run_dir / "doctor").iterdir()) == ["step_3.json", "step_6.json", "step_9.json"]
    for step in (3, 6, 9):
        report = json.loads((run_dir / "doctor" / f"step_{step}.json").read_text())
        assert [r["name"] for r in report["rows"]] == ["embedding", *(f"layer.{i}" for i in range(4)), "final_norm"]
        assert report["first_jump"] is None and max(r["rel_diff"] for r in report["rows"]) < 1e-5
        assert report["log_probs"]["max_abs_diff"] < 1e-4 and report["num_sequences"] == 2
        assert history[step - 1]["doctor/jump"] == 0.0
    assert [h["step"] for h in history if "doctor/max_rel_diff" in h] == [3, 6, 9]
    assert all(h["memory/actor_parked_gb"] > 0 and h["memory/critic_parked_gb"] > 0 for h in history)
    values = [h["critic/value_loss"] for h in history]
    assert sum(values[-3:]) < sum(values[:3]), values


def test_gae_with_critic_and_reference_under_pp2(rl_setup, ray_cluster):
    from engine.cli import train_ppo_ray

    # The reference (DP=2) shares the actor's placement group and keeps its weights offloaded; actor
    # and critic park their weights, gradients and optimizer state while the engine generates.
    # Every role scores and trains on packed micro-batches.
    history = train_ppo_ray.main(ppo_args(
        rl_setup, "--advantage_estimator", "gae", "--init_kl_coef", "0.01", "--max_steps", "9",
        "--actor_num_gpus_per_node", "2", "--actor_pipeline_model_parallel_size", "2",
        "--critic_learning_rate", "1e-4", "--packing_samples",
        "--colocate_actor_ref", "--ref_num_gpus_per_node", "2", "--ref_reward_offload", "--megatron_enable_sleep",
    ))
    assert max(h["rollout_logprob_abs_diff"] for h in history) < 1e-4  # PP=2: both stages synced
    assert all(h["memory/actor_parked_gb"] > 0 and h["memory/critic_parked_gb"] > 0 for h in history)
    assert all("critic/value_loss" in h and h["kl"] == h["kl"] for h in history)
    assert rise(history) >= MARGIN, [h["reward"] for h in history]


# ----- ptx: the actor loss with --pretrain_data, exact under every layout ---------------------

PTX_COEF, PTX_TEMPERATURE = 0.5, 0.7


def _ptx_experience(path: str):
    """A rollout step (8 rows, uneven response lengths) and its 8 pretraining rows, whose token
    counts differ a lot between the halves (a per-rank or per-micro-batch mean would show)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.rl.experience import Experience
    from engine.rl.ptx import collate_ptx
    from engine.rl.sequences import build_rollout_batch

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, 400, (int(n),), generator=g).tolist() for n in torch.randint(3, 8, (8,), generator=g)]
    responses = [torch.randint(5, 400, (int(n),), generator=g).tolist() for n in (1, 6, 3, 9, 2, 7, 4, 5)]
    rollout = build_rollout_batch(prompts, responses, pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids).logits / PTX_TEMPERATURE
        log_probs = torch.log_softmax(logits, -1).gather(-1, rollout.labels[..., None])[..., 0]
    mask = rollout.action_mask
    experience = Experience.from_rollout(rollout).with_fields(
        # stale by up to +-0.3 nats: ratios away from 1, some clipped
        old_log_probs=(log_probs + 0.3 * (2 * torch.rand(mask.shape, generator=g) - 1)) * mask,
        advantages=torch.randn(mask.shape, generator=g) * mask)
    lengths = (2, 3, 2, 4, 20, 17, 25, 19)
    samples = [{"input_ids": torch.randint(5, 400, (n,), generator=g).tolist(),
                "loss_mask": [0] * (i % 2) + [1] * (n - i % 2)} for i, n in enumerate(lengths)]
    return experience, collate_ptx(samples, pad_id=0)


def _ptx_settings():
    from engine.rl.train_losses import TrainSettings

    return TrainSettings(train_batch_size=8, micro_train_batch_size=2, max_epochs=1, seed=0, eps_clip=0.2,
                         value_clip=None, temperature=PTX_TEMPERATURE, kl_loss_coef=0.0, ptx_coef=PTX_COEF,
                         pad_token_id=0)


def _actor_train_with_ptx(rank, world_size, tp, path, experience, ptx):
    import os

    from engine.ray.role_worker import MegatronRoleWorker, RoleConfig
    from engine.runtime.engine import EngineConfig
    from engine.runtime.optimizer import OptimConfig
    from parallel.config import ParallelConfig

    engine = EngineConfig(pretrain=path, parallel=ParallelConfig(tensor_model_parallel_size=tp),
                          optim=OptimConfig(learning_rate=1e-4, lr_warmup_ratio=0.0, lr_scheduler="constant"))
    worker = MegatronRoleWorker(RoleConfig(name="actor", engine=engine, num_ranks=world_size, trainable=True), rank)
    worker.setup((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
    return worker.train(experience, "policy", _ptx_settings(), ptx=ptx)


def _hf_reference(path: str, experience, ptx: dict) -> dict:
    """The step's loss straight from its definition, on HF: the policy loss's token mean over all
    response tokens + PTX_COEF x the NLL's token mean over all pretraining tokens; grad norm."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.rl.losses import policy_loss

    model = AutoModelForCausalLM.from_pretrained(path)
    logits = model(input_ids=experience.input_ids).logits / PTX_TEMPERATURE
    log_probs = torch.log_softmax(logits, -1).gather(-1, experience.labels[..., None])[..., 0]
    policy, _ = policy_loss(log_probs, experience.old_log_probs, experience.advantages,
                            experience.action_mask, eps_clip=0.2)
    ptx_logits = model(input_ids=ptx["input_ids"]).logits
    nll = -torch.log_softmax(ptx_logits, -1).gather(-1, ptx["labels"][..., None])[..., 0]
    ptx_loss = (nll * ptx["loss_mask"]).sum() / ptx["loss_mask"].sum()
    (policy + PTX_COEF * ptx_loss).backward()
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    return {"policy_loss": float(policy), "ptx_loss": float(ptx_loss), "grad_norm": float(grad_norm)}


@pytest.fixture(scope="module")
def ptx_case(tmp_path_factory):
    from models.tiny import build_tiny_model

    path = build_tiny_model("llama", tmp_path_factory.mktemp("ptx") / "llama", seed=0)
    experience, ptx = _ptx_experience(path)
    return {"path": path, "experience": experience, "ptx": ptx, "reference": _hf_reference(path, experience, ptx)}


def test_ptx_actor_loss_and_gradient_are_exact_under_data_parallel(ptx_case):
    """DP=2 is where a wrong normalisation shows (the ranks' ptx token counts differ 4x); TP and
    PP reuse the vocab-parallel log-probs and the token-mean scale the policy loss is tested with."""
    from tests.dist_harness import run_distributed

    results = run_distributed(_actor_train_with_ptx, 2, timeout=300,
                              args=(1, ptx_case["path"], ptx_case["experience"], ptx_case["ptx"]))
    reference = ptx_case["reference"]
    for metrics in results:
        assert metrics["ptx_loss"] == pytest.approx(reference["ptx_loss"], abs=1e-5)
        assert metrics["policy_loss"] == pytest.approx(reference["policy_loss"], abs=1e-5)
        # the gradient of the whole combined loss, ptx weight and normalisation included
        assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


def test_ptx_samples_depend_on_the_rollout_only_and_flags_are_checked(tmp_path):
    from engine.cli import train_ppo_ray
    from engine.rl.ptx import PtxSampler

    data = [{"input_ids": [i], "loss_mask": [1]} for i in range(5)]
    draws = [PtxSampler(data, stride=3, seed=1).samples(step, 3) for step in range(4)]
    assert PtxSampler(data, stride=3, seed=1).samples(2, 2) == draws[2][:2]  # resumed: the same draw
    ids = [s["input_ids"][0] for draw in draws for s in draw]
    assert sorted(ids[:5]) == list(range(5)) and sorted(ids[5:10]) == list(range(5))  # reshuffled passes
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1+1="}\n')
    base = ["--pretrain", "unused", "--prompt_data", str(prompts), "--input_key", "prompt"]
    with pytest.raises(ValueError, match="--ptx_coef must be >= 0"):
        train_ppo_ray.main([*base, "--ptx_coef", "-1"])
    with pytest.raises(ValueError, match="--pretrain_data_probs has 2 values but --pretrain_data names 1"):
        train_ppo_ray.main([*base, "--pretrain_data", str(prompts), "--pretrain_data_probs", "0.5,0.5"])


# ----- remote RM end to end through serve_rm, with the ptx term on ----------------------------

PTX_TEXTS = ["the quick brown fox jumps over the lazy dog", "1+1=2 and 2+2=4 and 3+3=6",
             "pack my box with five dozen liquor jugs", "a b c d e f g h i j k l m n o p"]


class _RecordingProxy:
    """Forwards /get_reward to the reward server and keeps every (queries, rewards) exchange.
    ``until_ready`` runs before the first forward: the server starts while Ray and vLLM do."""

    def __init__(self, target: str, until_ready):
        import json
        import threading
        import urllib.request
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        exchanges = self.exchanges = []
        self.errors = errors = []
        ready_lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                try:
                    with ready_lock:
                        until_ready()
                except AssertionError as exc:  # the server died or hung: make the client stop at once
                    errors.append(exc)
                    self.send_response(400)
                    self.end_headers()
                    return
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = urllib.request.Request(target, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = response.read()
                exchanges.append((json.loads(body)["query"], json.loads(answer)["rewards"]))
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/get_reward"

    def __enter__(self):
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_grpo_with_serve_rm_rewards_and_ptx(rl_setup, ray_cluster):
    import json
    import math

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from engine.cli import train_ppo_ray
    from tests.test_remote_rewards import _hf_scores, launch_serve_rm, stop_serve_rm, wait_for_serve_rm

    root = rl_setup["root"]
    torch.manual_seed(0)
    rm = root / "serve_rm_model"
    AutoModelForSequenceClassification.from_pretrained(rl_setup["model"], num_labels=1).save_pretrained(rm)
    AutoTokenizer.from_pretrained(rl_setup["model"]).save_pretrained(rm)
    pretrain = root / "ptx.jsonl"
    pretrain.write_text("".join(json.dumps({"text": t}) + "\n" for t in PTX_TEXTS))
    log = root / "serve_rm_e2e.log"
    proc, rm_url = launch_serve_rm(str(rm), log)
    try:
        with _RecordingProxy(rm_url, lambda: wait_for_serve_rm(proc, rm_url, log)) as proxy:
            args = ppo_args(rl_setup, "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--max_steps", "3",
                             "--n_samples_per_prompt", "4", "--rollout_batch_size", "4", "--train_batch_size", "16",
                             "--micro_train_batch_size", "8", "--learning_rate", "1e-3",
                             "--pretrain_data", str(pretrain), "--pretrain_data_input_key", "text",
                             "--ptx_coef", "1.0")
            args[args.index("--remote_rm_url") + 1] = proxy.url  # the server instead of the reward file
            try:
                history = train_ppo_ray.main(args)
            finally:
                if proxy.errors:
                    raise proxy.errors[0]
    finally:
        assert stop_serve_rm(proc) == 0
    assert len(history) == 3 and len(proxy.exchanges) == 3  # one request of 16 samples per rollout
    for metrics, (queries, rewards) in zip(history, proxy.exchanges):
        assert len(queries) == 16 and all(math.isfinite(r) for r in rewards)
        assert len(set(rewards)) > 1
        # the loop's rewards are the server's, and the server's are the HF reward model's
        assert metrics["reward"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
        assert rewards == pytest.approx(_hf_scores(str(rm), queries), abs=1e-5)
    ptx_losses = [h["actor/ptx_loss"] for h in history]
    assert ptx_losses[-1] < ptx_losses[0] - 0.1, ptx_losses  # ptx_coef 1: the four texts are learnt
