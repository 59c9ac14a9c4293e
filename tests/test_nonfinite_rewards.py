"""A non-finite reward never reaches the weights (issue 33, case 1).

Before the fix a reward function answering NaN for one sample made the advantages, the loss and
every actor weight NaN, and the run still exited 0 with a NaN export. Now the default
(``--nonfinite_reward_policy error``) stops at the first rollout naming the source and the sample;
``skip`` drops the sample's prompt group (counted as ``rollout/nonfinite_rewards``), trains on a
multiple of ``--train_batch_size`` of the rest, and the export loads with finite logits.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from engine.rl.rewards import NonFiniteRewardError, RemoteRewardModel, RewardFunction

N = 4  # samples per prompt
BAD_SAMPLE = 5  # prompt 1, its sample 1
NAN_REWARD_FUNC = f'''
def reward_func(prompts, responses, labels):
    return [float("nan") if i == {BAD_SAMPLE} else float(len(r) % 3) for i, r in enumerate(responses)]
'''


class _NanRewardHandler(BaseHTTPRequestHandler):
    """A real HTTP reward server answering NaN (JSON's ``NaN``, as Python writes it) for one sample."""

    def do_POST(self):
        queries = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["query"]
        rewards = [float("nan") if i == BAD_SAMPLE else 1.0 for i in range(len(queries))]
        data = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def nan_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NanRewardHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/get_reward"
    server.shutdown()


def _trainer(policy: str, sources, train_batch_size: int = 8):
    """The loop's scoring and advantage phases: 4 prompts x 4 samples, GRPO, no KL (a rollout of one
    optimizer step scores no log-probs: neither the actor nor the engines are needed)."""
    from engine.rl.advantages import AdvantageConfig
    from engine.rl.ppo_trainer import PPOConfig, PPOTrainer
    from engine.rl.rollout import SamplingConfig

    config = PPOConfig(advantage=AdvantageConfig(estimator="grpo", n_samples_per_prompt=N), rollout_batch_size=4,
                       n_samples_per_prompt=N, train_batch_size=train_batch_size, init_kl_coef=0.0,
                       nonfinite_reward_policy=policy)
    prompts = [{"prompt": f"{i}+1=", "prompt_ids": [1, 2 + i], "label": str(i + 1)} for i in range(4)]
    return PPOTrainer(config, prompts=prompts, tokenizer=None, rollouts=None, actor=None, sampling=SamplingConfig(),
                      reward_sources=sources)


def _rollout():
    from engine.rl.experience import Experience
    from engine.rl.sequences import build_rollout_batch

    prompt_ids = [[1, 2 + i // N] for i in range(4 * N)]
    responses = [[5 + (i % 3)] * (1 + i % 3) for i in range(4 * N)]
    batch = build_rollout_batch(prompt_ids, responses, pad_id=0)
    meta = {"prompts": [f"{i // N}+1=" for i in range(4 * N)], "responses": [str(r) for r in responses],
            "labels": [str(i // N + 1) for i in range(4 * N)]}
    return Experience.from_rollout(batch), meta, batch


def test_a_nan_reward_is_an_error_naming_the_source_and_the_sample(tmp_path, nan_server):
    path = tmp_path / "nan_reward.py"
    path.write_text(NAN_REWARD_FUNC)
    _, meta, batch = _rollout()
    for source, name in ((RewardFunction(str(path)), f"reward_func of {path}"),
                         (RemoteRewardModel(nan_server), f"reward server {nan_server}")):
        with pytest.raises(NonFiniteRewardError) as caught:
            _trainer("error", [source], train_batch_size=4 * N).score(batch, meta)
        message = str(caught.value)
        assert name in message and "--remote_rm_url" in message
        assert f"sample {BAD_SAMPLE} of the rollout (prompt 1, its sample 1)" in message
        assert "--nonfinite_reward_policy skip" in message


def test_skip_drops_the_group_and_trains_on_a_multiple_of_the_batch(tmp_path):
    path = tmp_path / "nan_reward.py"
    path.write_text(NAN_REWARD_FUNC)
    trainer = _trainer("skip", [RewardFunction(str(path))])
    experience, meta, _ = _rollout()
    rewards = trainer._rewards(experience, meta, N)
    assert torch.isnan(rewards[BAD_SAMPLE]) and int(torch.isnan(rewards).sum()) == 1
    kept, kept_rewards, dropped = trainer._drop_nonfinite_groups(experience, rewards)
    assert dropped == 1
    # Prompt 1's whole group left; the other three groups stay in order.
    expected_rows = [*range(0, N), *range(2 * N, 4 * N)]
    assert torch.equal(kept.input_ids, experience.input_ids[expected_rows])
    assert torch.equal(kept_rewards, rewards[expected_rows])
    trained, _ = trainer.advantages(kept, kept_rewards)
    assert trained.batch_size == 8  # 12 rows left: one --train_batch_size of them
    assert torch.isfinite(trained.advantages).all() and torch.isfinite(trained.returns).all()


def test_grpo_run_skips_nan_reward_groups_and_exports_finite_weights(tmp_path, ray_cluster):
    """A real run (Ray roles, a vLLM engine) with skip: two rollouts train on the finite groups, and
    the HF export holds finite weights that load in transformers and give finite logits. (The
    default's error is the same scoring call as in the test above.)"""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.cli import demo, train_ppo_ray

    model, data = demo.prepare(tmp_path)
    reward = tmp_path / "nan_reward.py"
    reward.write_text(NAN_REWARD_FUNC)

    def args(*extra: str) -> list[str]:
        return ["--run_dir", str(tmp_path / "run"), "--pretrain", model, "--prompt_data", f"json@{data}",
                "--input_key", "prompt", "--label_key", "label", "--remote_rm_url", str(reward),
                "--advantage_estimator", "grpo", "--init_kl_coef", "0", "--n_samples_per_prompt", str(N),
                "--rollout_batch_size", "4", "--train_batch_size", "8", "--micro_train_batch_size", "4",
                "--micro_rollout_batch_size", "16", "--generate_max_len", "4", "--learning_rate", "1e-3",
                "--enforce_eager", "--vllm_dtype", "float32", "--seed", "3", *extra]

    export = tmp_path / "export"
    history = train_ppo_ray.main(args("--max_steps", "2", "--nonfinite_reward_policy", "skip",
                                      "--save_path", str(export)))
    assert [h["rollout/nonfinite_rewards"] for h in history] == [1, 1]
    assert all(h["actor/skipped_steps"] == 0 and torch.isfinite(torch.tensor(h["actor/policy_loss"]))
               for h in history)
    weights = {k: t for f in export.glob("*.safetensors") for k, t in load_file(str(f)).items()}
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    logits = hf(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()
