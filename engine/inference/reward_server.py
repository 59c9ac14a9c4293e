"""An HTTP reward server (OpenRLHF's protocol) around an HF reward model: what
``python -m engine.cli.serve_rm`` runs and ``engine.rl.rewards.RemoteRewardModel`` talks to.

    POST /get_reward  {"query": [text, ...], "prompts": [...], "labels": [...]}  ->  {"rewards": [float, ...]}
    GET  /health      -> {"status": "ok", ...}

Each query (prompt + response text) is scored at its last token after appending eos
(``engine.inference.batch.RewardScorer``). Malformed requests get HTTP 400 with a JSON
``{"error": ...}`` naming what is wrong; a failure while scoring gets 500 (the client retries
those, not 400s). Handler threads share one model: calls into it are serialised by a lock.
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from parallel.options import option

REWARD_PATH = "/get_reward"
HEALTH_PATH = "/health"
MAX_BODY_BYTES = 256 << 20  # a request this large is a client bug, not a batch


@dataclass(kw_only=True)
class RewardServerConfig:
    """The reward model served and where."""

    reward_pretrain: str = option(help="reward model: HF AutoModelForSequenceClassification directory (num_labels=1) "
                                       "or Megatron checkpoint of one")
    host: str = option("0.0.0.0", help="interface to listen on")
    port: int = option(5000, help="port (0 picks a free one, printed)")
    micro_batch_size: int = option(16, help="queries per forward pass")
    max_len: int = option(2048, help="tokens per query, eos included (longer: cut)")
    normalize_reward: bool = option(False, help="(r - mean) / std with the mean / std fields of the reward "
                                                "model's config.json")
    value_head_prefix: str = option("score", help="the reward head's tensor is <prefix>.weight (OpenRLHF's)")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.micro_batch_size < 1:
            raise ValueError(f"--micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_len < 2:
            raise ValueError(f"--max_len must be >= 2 (one token and the eos), got {self.max_len}")


class BadRequest(ValueError):
    """The request is malformed; the message says how (sent back with HTTP 400)."""


# ----------------------------------------------------------------------------- the protocol

def parse_reward_request(body: bytes) -> list[str]:
    """The ``query`` texts of a ``/get_reward`` body, or ``BadRequest`` naming the problem.

    ``prompts`` and ``labels`` are optional (a reward model needs neither), but when sent they
    must line up with ``query``: a mismatch means the client mixed up its batch.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f'the request body must be a JSON object with a "query" list, got {type(payload).__name__}')
    if "query" not in payload:
        raise BadRequest('missing "query": expected a list of strings (prompt + response texts)')
    queries = _string_list(payload["query"], "query")
    for key in ("prompts", "labels"):
        value = payload.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise BadRequest(f'"{key}" must be a list (or null), got {type(value).__name__}')
        if len(value) != len(queries):
            raise BadRequest(f'"{key}" has {len(value)} items but "query" has {len(queries)}')
    if payload.get("prompts") is not None:
        _string_list(payload["prompts"], "prompts")
    return queries


def _string_list(value, key: str) -> list[str]:
    if not isinstance(value, list):
        raise BadRequest(f'"{key}" must be a list of strings, got {type(value).__name__}')
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise BadRequest(f'"{key}" must be a list of strings; item {index} is {type(item).__name__}')
    return value


# ------------------------------------------------------------------------------- the model

def reward_normalisation(model_config, path: str) -> tuple[float, float]:
    """``(mean, std)`` the reward-model trainer saved in the RM's config.json."""
    mean, std = getattr(model_config, "mean", None), getattr(model_config, "std", None)
    missing = [name for name, value in (("mean", mean), ("std", std)) if value is None]
    if missing:
        raise ValueError(
            f"--normalize_reward: {path}/config.json has no {' / '.join(repr(m) for m in missing)} field; "
            "it is written by the reward-model trainer with --normalize_reward (or drop the flag)"
        )
    mean, std = float(mean), float(std)
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"--normalize_reward: {path}/config.json has mean={mean}, std={std}; std must be > 0")
    return mean, std


class RewardService:
    """The reward model behind the handlers: one scorer, calls serialised by a lock."""

    def __init__(self, config: RewardServerConfig, scorer=None):
        if scorer is None:
            from engine.inference.batch import RewardScorer

            scorer = RewardScorer(config.reward_pretrain, micro_batch_size=config.micro_batch_size,
                                  max_len=config.max_len, flag="--reward_pretrain",
                                  value_head_prefix=config.value_head_prefix)
        self.scorer = scorer
        self.config = config
        self.mean, self.std = 0.0, 1.0
        if config.normalize_reward:
            self.mean, self.std = reward_normalisation(scorer.model.config, config.reward_pretrain)
        self._lock = threading.Lock()

    def rewards(self, queries: list[str]) -> list[float]:
        with self._lock:  # torch modules are not safe to call from several threads at once
            scores = self.scorer.score_texts(queries) if queries else []
        return [(score - self.mean) / self.std for score in scores]


# -------------------------------------------------------------------------------- the server

class _Handler(BaseHTTPRequestHandler):
    service: RewardService  # set on the subclass made by make_server

    def do_GET(self):
        if self.path.split("?")[0] != HEALTH_PATH:
            return self._reply(404, {"error": f"no such path {self.path!r}; GET {HEALTH_PATH} or POST {REWARD_PATH}"})
        self._reply(200, {"status": "ok", "model": self.service.config.reward_pretrain})

    def do_POST(self):
        if self.path.split("?")[0] != REWARD_PATH:
            return self._reply(404, {"error": f"no such path {self.path!r}; POST {REWARD_PATH}"})
        try:
            queries = parse_reward_request(self._body())
        except BadRequest as exc:
            return self._reply(400, {"error": str(exc)})
        try:
            rewards = self.service.rewards(queries)
        except Exception as exc:  # noqa: BLE001 - the client sees the cause, the server keeps serving
            return self._reply(500, {"error": f"scoring failed: {exc!r}"})
        self._reply(200, {"rewards": rewards})

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("missing or invalid Content-Length header")
        if int(length) > MAX_BODY_BYTES:
            raise BadRequest(f"request body of {int(length)} bytes exceeds {MAX_BODY_BYTES}; send smaller batches")
        return self.rfile.read(int(length))

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # one line per request would drown the trainer's logs; errors go back in the reply


def make_server(config: RewardServerConfig, service: RewardService) -> ThreadingHTTPServer:
    """A bound (not yet serving) threaded HTTP server; ``port=0`` picks a free port."""
    handler = type("RewardHandler", (_Handler,), {"service": service})
    server = ThreadingHTTPServer((config.host, config.port), handler)
    server.daemon_threads = True  # in-flight requests do not hold up shutdown
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}{REWARD_PATH}"
