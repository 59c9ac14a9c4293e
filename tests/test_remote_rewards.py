"""Reward sources of the RL loop: reward_func files and HTTP reward servers (OpenRLHF protocol)."""
from __future__ import annotations

import json
import socket
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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/get_reward"
    (source,) = make_reward_sources(url, timeout_s=1.0, max_retries=1)
    started = time.monotonic()
    with pytest.raises(RewardServerError, match="--remote_rm_url") as info:
        source.score(["a"], ["b"], None)
    assert url in str(info.value)
    assert time.monotonic() - started < 10


def test_reward_function_file(tmp_path):
    good = tmp_path / "reward.py"
    good.write_text("def reward_func(prompts, responses, labels):\n    return [float(r == l) for r, l in zip(responses, labels)]\n")
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
