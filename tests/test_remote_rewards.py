"""Reward sources of the RL loop: reward_func files and HTTP reward servers (OpenRLHF protocol)."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine.rl.rewards import (
    RewardFunction,
    RewardFunctionError,
    RewardServerError,
    combine_rewards,
    make_reward_sources,
)
from parallel.ports import free_port


class _LengthRewardHandler(BaseHTTPRequestHandler):
    """A real HTTP reward server: reward = length of the query text."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "query" not in body:
            self.send_response(400)
            self.end_headers()
            return
        data = json.dumps({"rewards": [float(len(q)) for q in body["query"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LengthRewardHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/get_reward"
    server.shutdown()


def test_remote_reward_model_round_trip_in_batches(server_url):
    (source,) = make_reward_sources(server_url)
    source.batch_size = 2
    prompts, responses = ["1+1=", "2+2=", "10+1="], ["2", "4", "11"]
    assert source.score(prompts, responses, None) == [5.0, 5.0, 7.0]


def test_unreachable_reward_server_fails_clearly():
    port = free_port()  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/get_reward"
    (source,) = make_reward_sources(url, timeout_s=1.0, max_retries=1)
    started = time.monotonic()
    with pytest.raises(RewardServerError, match="--remote_rm_url") as info:
        source.score(["a"], ["b"], None)
    assert url in str(info.value)
    assert time.monotonic() - started < 10


def test_reward_function_file(tmp_path):
    good = tmp_path / "reward.py"
    good.write_text("def reward_func(prompts, responses, labels):\n"
                    "    return [float(r == l) for r, l in zip(responses, labels)]\n")
    assert RewardFunction(str(good)).score(["p", "q"], ["1", "2"], ["1", "3"]) == [1.0, 0.0]
    wrong_count = tmp_path / "short.py"
    wrong_count.write_text("def reward_func(prompts, responses, labels):\n    return [1.0]\n")
    with pytest.raises(RewardFunctionError, match="returned 1 rewards for 2 samples"):
        RewardFunction(str(wrong_count)).score(["p", "q"], ["1", "2"], None)
    missing = tmp_path / "none.py"
    missing.write_text("x = 1\n")
    with pytest.raises(RewardFunctionError, match="defines no reward_func"):
        RewardFunction(str(missing))
    with pytest.raises(RewardFunctionError, match="no such file"):
        RewardFunction(str(tmp_path / "absent.py"))


def test_arithmetic_task_reward():
    from engine.tasks import arithmetic

    source = RewardFunction(arithmetic.__file__)
    assert source.score(["3+4=", "3+4=", "9+9="], ["7", "8", "18 and more"], ["7", "7", "18"]) == [1.0, 0.0, 1.0]
    assert combine_rewards([[1.0, 0.0], [0.0, 0.0]]) == [0.5, 0.0]


# ----- engine.cli.serve_rm: a real reward server process around an HF reward model ---------

RM_MEAN, RM_STD = 0.25, 2.0  # what the reward-model trainer saves for --normalize_reward
QUERIES = ["1+1=2", "12+30=42 and some more words", "", "9+9=", "a longer query: " + "7+8=15 " * 6]




def _make_reward_model(root, policy: str, *, with_stats: bool) -> str:
    """A tiny RM the way this project exports them: SequenceClassification, num_labels=1, `score` head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    if with_stats:
        model.config.mean, model.config.std = RM_MEAN, RM_STD
    path = root / ("rm_stats" if with_stats else "rm")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(policy).save_pretrained(path)
    return str(path)


def _hf_scores(path: str, texts: list[str]) -> list[float]:
    """The reference: HF's own forward of each text alone (eos appended), its logit."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            scores.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return scores


def _request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def launch_serve_rm(rm_path: str, log_path, *extra: str):
    """Start ``python -m engine.cli.serve_rm`` on a free port; returns (process, reward URL)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli.serve_rm", "--reward_pretrain", rm_path, "--host", "127.0.0.1",
             "--port", str(port), *extra],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}/get_reward"


def wait_for_serve_rm(proc, url: str, log_path, *, timeout_s: float = 120.0) -> None:
    """Poll /health until it answers 200 (bounded); fail with the server's log if it dies or hangs."""
    import urllib.error

    health = url.replace("/get_reward", "/health")
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"serve_rm exited with {proc.returncode}:\n{open(log_path).read()}")
        try:
            if _request(health)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve_rm did not answer /health within {timeout_s:.0f}s:\n{open(log_path).read()}")
        time.sleep(0.25)


def start_serve_rm(rm_path: str, log_path, *extra: str):
    proc, url = launch_serve_rm(rm_path, log_path, *extra)
    wait_for_serve_rm(proc, url, log_path)
    return proc, url


def stop_serve_rm(proc) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=20)
    except Exception:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def reward_models(tmp_path_factory):
    from models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("serve_rm")
    policy = build_tiny_model("llama", root / "policy", seed=0)
    return {"plain": _make_reward_model(root, policy, with_stats=False),
            "stats": _make_reward_model(root, policy, with_stats=True), "root": root}


@pytest.fixture(scope="module")
def serve_rm(reward_models):
    # micro-batches of 2: the queries are scored in several right-padded batches of mixed lengths
    proc, url = start_serve_rm(reward_models["stats"], reward_models["root"] / "serve_rm.log",
                               "--micro_batch_size", "2")
    yield {"proc": proc, "url": url, "log": reward_models["root"] / "serve_rm.log"}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_rm_rewards_equal_the_hf_model_scores(serve_rm, reward_models):
    (source,) = make_reward_sources(serve_rm["url"])
    source.batch_size = 4  # two requests
    prompts = [q[:3] for q in QUERIES]
    rewards = source.score(prompts, [q[3:] for q in QUERIES], ["x"] * len(QUERIES))
    expected = _hf_scores(reward_models["stats"], QUERIES)
    assert rewards == pytest.approx(expected, abs=1e-5)
    assert len(set(round(r, 4) for r in rewards)) > 1  # a constant would pass too easily
    assert _request(serve_rm["url"], json.dumps({"query": []}).encode()) == (200, {"rewards": []})


@pytest.mark.parametrize("body,message", [
    (b"{not json", "not valid JSON"),
    (json.dumps(["a", "b"]).encode(), "JSON object"),
    (json.dumps({"prompts": ["a"]}).encode(), 'missing "query"'),
    (json.dumps({"query": "a b"}).encode(), '"query" must be a list of strings, got str'),
    (json.dumps({"query": ["a", 3]}).encode(), "item 1 is int"),
    (json.dumps({"query": ["a", "b"], "prompts": ["a"]}).encode(), '"prompts" has 1 items but "query" has 2'),
], ids=["not_json", "not_object", "no_query", "query_str", "query_item", "prompts_length"])
def test_serve_rm_rejects_malformed_requests_with_400(serve_rm, body, message):
    status, answer = _request(serve_rm["url"], body)
    assert status == 400 and message in answer["error"], answer


def test_serve_rm_client_errors_are_not_retried(serve_rm):
    (source,) = make_reward_sources(serve_rm["url"].replace("/get_reward", "/wrong"), max_retries=0)
    with pytest.raises(RewardServerError, match="HTTP 404"):
        source.score(["a"], ["b"], None)


def test_serve_rm_normalize_reward_uses_the_config_statistics(reward_models):
    from engine.cli import serve_rm
    from engine.inference.reward_server import RewardService

    config = serve_rm.parse_args(["--reward_pretrain", reward_models["stats"], "--normalize_reward"])
    rewards = RewardService(config).rewards(QUERIES[:2])
    expected = [(r - RM_MEAN) / RM_STD for r in _hf_scores(reward_models["stats"], QUERIES[:2])]
    assert rewards == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match=r"--normalize_reward: .*no 'mean' / 'std' field"):
        serve_rm.main(["--reward_pretrain", reward_models["plain"], "--normalize_reward", "--port", "0"])


def test_serve_rm_shuts_down_on_sigterm(serve_rm):
    import urllib.error

    assert stop_serve_rm(serve_rm["proc"]) == 0, open(serve_rm["log"]).read()
    log = open(serve_rm["log"]).read()
    assert "--remote_rm_url http://127.0.0.1:" in log and "reward server stopped" in log
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _request(serve_rm["url"].replace("/get_reward", "/health"))
