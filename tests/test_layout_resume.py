"""Resume at another layout: a checkpoint written at one TP / PP / DP layout continues at another
(model, optimizer state, schedule, data position resharded; the RNG re-seeded and said), and
``tools.plan --from_checkpoint`` proposes the layouts it resumes at on a cluster.

Each SFT check copies the TP=2 run's checkpoint of step 3 and holds the resumed steps against that
run's own; the GRPO check does the same with the actor of an RL run (two engines on HF ``generate``,
``tests/hf_rollout_backend.py``, cheaper to start than vLLM's)."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from models.mcore_checkpoint import read_meta
from tests.dist_harness import run_distributed
from tests.test_plan import _in_process, _plan_cli
from tests.test_sft import _assert_same_curve, _run, _train

STEPS, SAVED = 5, 3
SEED = 42  # EngineConfig's default --seed
# The tiny vocabulary (500) padded to a multiple of 100 x TP: 600 rows at TP=2, 500 at TP=1, so every
# resume below also changes the padded vocabulary (as Llama-3's does between TP=1 and TP=8).
BUILD = {"make_vocab_size_divisible_by": 100}
LOOP = {"train_batch_size": 16, "micro_train_batch_size": 4}


@pytest.fixture(scope="module")
def arithmetic_data(tmp_path_factory) -> str:
    from engine.tasks.arithmetic import make_rows, write_jsonl

    directory = tmp_path_factory.mktemp("layout_data")
    write_jsonl(make_rows(128, max_operand=9, seed=0), directory / "train.jsonl")
    write_jsonl(make_rows(8, max_operand=9, seed=1), directory / "test.jsonl")
    return str(directory)


@pytest.fixture(scope="module")
def tp2_run(tiny_models, arithmetic_data, tmp_path_factory) -> dict:
    """The uninterrupted TP=2 x DP=1 run, checkpointing after step 3."""
    root = tmp_path_factory.mktemp("tp2_run")
    ckpt = {"ckpt_path": str(root / "ckpt"), "save_steps": SAVED, "max_ckpt_num": 4}
    result = _run(tiny_models["llama"], arithmetic_data, {"tensor_model_parallel_size": 2}, 2,
                  loop={**LOOP, "max_steps": STEPS}, checkpoint=ckpt, build=BUILD)
    return {"result": result, "ckpt": root / "ckpt"}


def _from_step3(tp2_run, tmp_path) -> dict:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tp2_run["ckpt"] / f"global_step{SAVED}", ckpt / f"global_step{SAVED}")
    return {"ckpt_path": str(ckpt), "save_steps": 100, "load_checkpoint": True}


def _train_then_draw(rank, world_size, *args):
    """test_sft's training body (its printed lines kept), then one draw of Python's global RNG (training
    draws none from it)."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = _train(rank, world_size, *args)
    return {**result, "draw": random.random(), "printed": printed.getvalue()}


@pytest.mark.parametrize("layout", [{}, {"pipeline_model_parallel_size": 2}], ids=["dp2", "pp2"])
def test_sft_tp2_checkpoint_resumes_at_another_layout(layout, tp2_run, tiny_models, arithmetic_data, tmp_path):
    checkpoint = _from_step3(tp2_run, tmp_path)
    assert read_meta(tp2_run["ckpt"] / f"global_step{SAVED}")["padded_vocab_size"] == 600
    ranks = run_distributed(_train_then_draw, 2, timeout=300, args=(
        tiny_models["llama"], arithmetic_data, layout, {**LOOP, "max_steps": STEPS}, checkpoint, False, 1e-3, BUILD,
        None))
    _assert_same_curve(ranks[0]["loss"], tp2_run["result"]["loss"][SAVED:])
    for got, want in zip(ranks[0]["grad_norm"], tp2_run["result"]["grad_norm"][SAVED:]):
        assert abs(got - want) <= 1e-3 * want
    # Per-rank RNG states do not carry over to another grid: every rank re-seeded with --seed + step, said once.
    assert [r["draw"] for r in ranks] == [random.Random(SEED + SAVED).random()] * 2
    said = [line for r in ranks for line in r["printed"].splitlines() if "re-seeded" in line]
    now = "TP1 x PP2 x CP1 x EP1 x ETP1 x DP1" if layout else "TP1 x PP1 x CP1 x EP1 x ETP1 x DP2"
    assert len(said) == 1 and "written at TP2 x PP1 x CP1 x EP1 x ETP2 x DP1 (2 ranks)" in said[0] and \
        f"this run is {now} (2 ranks)" in said[0] and f"--seed + step = {SEED + SAVED}" in said[0], said


def test_plan_from_checkpoint_proposes_the_layouts_it_resumes_at(tp2_run):
    """On two GPUs: TP2 (the checkpoint's own, marked), PP2 and DP2 (resumed above), CP2; the model
    and job are the checkpoint's."""
    from engine.cli.options import OptionError
    from tools.plan.cli import parse_args

    argv = ["--from_checkpoint", str(tp2_run["ckpt"]), "--nodes", "1", "--gpus_per_node", "2",
            "--train_batch_size", "16", "--max_len", "32", "--fp32", "--recompute_granularity", "none"]
    out = _in_process(_plan_cli, [*argv, "--json"])
    info = out["checkpoint"]
    # A --ckpt_path: its newest checkpoint (the run's last step).
    assert info["step"] == STEPS and info["job"] == "sft" and info["model_type"] == "llama"
    assert info["path"].endswith(f"global_step{STEPS}") and info["saved_batch"] == {"train_batch_size": 16}
    assert info["saved_layout"]["tensor_model_parallel_size"] == 2 and info["saved_layout"]["world_size"] == 2
    layouts = {p["layout"]: p for p in out["plans"]}
    assert set(layouts) == {"TP2 PP1 CP1 SP", "TP1 PP2 CP1", "TP1 PP1 CP1", "TP1 PP1 CP2"}, sorted(layouts)
    assert [label for label, p in layouts.items() if p["saved_layout"]] == ["TP2 PP1 CP1 SP"]
    assert layouts["TP1 PP1 CP1"]["data_parallel_size"] == 2 and all(p["fits"] for p in out["plans"])
    text = _in_process(_plan_cli, argv)
    assert "TP2 PP1 CP1 SP" in text and "(the checkpoint's layout)" in text, text[:2000]
    assert "written at TP2 x PP1 x CP1 x EP1 x DP1 (2 ranks); job sft" in text, text[:2000]
    with pytest.raises(OptionError, match="--from_checkpoint plans for the checkpoint's own model: drop --model"):
        parse_args([*argv, "--model", "llama3-8b"])


# ----- GRPO: the actor's checkpoint at TP=2 resumes at TP=1 ---------------------------------------
REWARD_FUNC = '''
def reward_func(prompts, responses, labels):
    return [1.0 if r.strip().startswith("1") else 0.0 for r in responses]
'''
RL_STEPS, RL_SAVED = 3, 2
RL_TOLERANCE = 1e-4  # absolute on the policy loss (GRPO's is near 0 on policy) and relative on the rest


def _grpo_args(root, model, data, *extra: str) -> list[str]:
    return [
        "--pretrain", model, "--prompt_data", f"json@{data}", "--input_key", "prompt", "--label_key", "label",
        "--remote_rm_url", str(root / "reward.py"), "--advantage_estimator", "grpo", "--init_kl_coef", "0",
        "--n_samples_per_prompt", "4", "--rollout_batch_size", "8", "--train_batch_size", "32",
        "--micro_train_batch_size", "16", "--micro_rollout_batch_size", "32", "--generate_max_len", "6",
        "--learning_rate", "1e-3", "--lr_warmup_ratio", "0", "--lr_scheduler", "constant", "--seed", "7",
        "--rollout_backend", "hf_generate", "--vllm_num_engines", "2", "--max_steps", str(RL_STEPS),
        "--enable_ema", "--ema_beta", "0.5", *extra,
    ]


@pytest.fixture(scope="module")
def grpo_runs(ray_cluster, tmp_path_factory) -> dict:
    """The uninterrupted GRPO run (actor TP=2 with an EMA, two engines, a checkpoint after rollout 2),
    and a run resumed from that checkpoint with the actor at TP=1; each exports its EMA."""
    from engine.cli import demo, train_ppo_ray
    from engine.ray.rollout_backends import ROLLOUT_BACKENDS, register_rollout_backend

    root = tmp_path_factory.mktemp("grpo_layout")
    model, data = demo.prepare(root)
    (root / "reward.py").write_text(REWARD_FUNC)
    register_rollout_backend("hf_generate", "tests.hf_rollout_backend:BACKEND")
    try:
        whole = train_ppo_ray.main(_grpo_args(
            root, model, data, "--actor_num_gpus_per_node", "2", "--actor_tensor_model_parallel_size", "2",
            "--ckpt_path", str(root / "ckpt_tp2"), "--save_steps", str(RL_SAVED), "--max_ckpt_num", "4",
            "--run_dir", str(root / "run_tp2"), "--save_path", str(root / "out_tp2")))
        saved = root / "ckpt_tp1" / "actor" / f"global_step{RL_SAVED}"
        shutil.copytree(root / "ckpt_tp2" / "actor" / f"global_step{RL_SAVED}", saved)
        resumed = train_ppo_ray.main(_grpo_args(
            root, model, data, "--ckpt_path", str(root / "ckpt_tp1"), "--load_checkpoint",
            "--run_dir", str(root / "run_tp1"), "--save_path", str(root / "out_tp1")))
    finally:
        ROLLOUT_BACKENDS.pop("hf_generate")
    return {"whole": whole, "resumed": resumed, "root": root, "saved": saved}


def test_grpo_actor_checkpoint_at_tp2_resumes_at_tp1(grpo_runs):
    whole, resumed = grpo_runs["whole"], grpo_runs["resumed"]
    assert [h["step"] for h in resumed] == list(range(RL_SAVED + 1, RL_STEPS + 1))
    for got, want in zip(resumed, whole[RL_SAVED:]):
        assert got["reward"] == want["reward"]  # the same prompts, the same samples
        for key in ("actor/policy_loss", "response_length"):
            assert abs(got[key] - want[key]) <= RL_TOLERANCE * max(1.0, abs(want[key])), (key, got, want)
    # The engines were given the resumed TP=1 actor's weights: their log-probs are the actor's.
    assert max(h["rollout_logprob_abs_diff"] for h in resumed) < 1e-4
    # The EMA went across the layout change with the weights: the two exports agree.
    want, got = _safetensors(grpo_runs["root"] / "out_tp2"), _safetensors(grpo_runs["root"] / "out_tp1")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def _safetensors(directory) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_plan_from_an_rl_checkpoint_is_the_actors_grpo_job(grpo_runs):
    out = _in_process(_plan_cli, ["--from_checkpoint", str(grpo_runs["root"] / "ckpt_tp2"), "--nodes", "1",
                                  "--gpus_per_node", "4", "--vllm_num_engines", "2", "--rollout_batch_size", "8",
                                  "--n_samples_per_prompt", "4", "--max_len", "64", "--generate_max_len", "8",
                                  "--fp32", "--recompute_granularity", "none", "--json"])
    info = out["checkpoint"]
    assert info["job"] == "grpo" and info["job_from"] == "an RL actor checkpoint without a critic"
    assert info["path"].endswith(f"actor/global_step{RL_STEPS}") and info["saved_batch"] == {"rollout_batch_size": 8}
    assert info["saved_layout"]["tensor_model_parallel_size"] == 2 and info["saved_layout"]["world_size"] == 2
    # Two GPUs train beside the two engines': the checkpoint's TP2 (marked) and the TP1 resumed above.
    layouts = {p["layout"]: p["saved_layout"] for p in out["plans"]}
    assert layouts.get("TP2 PP1 CP1 SP") is True and layouts.get("TP1 PP1 CP1") is False, layouts
    assert all(p["job"] == "grpo" and p["training_gpus"] == 2 for p in out["plans"])
