"""Serve a reward model (HF directory or Megatron checkpoint) over HTTP (OpenRLHF's reward-server protocol).

    python -m engine.cli.serve_rm --reward_pretrain RM_HF_DIR --port 5000 [--host 0.0.0.0] \\
        [--micro_batch_size 16] [--max_len 2048] [--normalize_reward]

    python -m engine.cli.train_ppo_ray ... --remote_rm_url http://HOST:5000/get_reward

POST /get_reward {"query": [prompt + response, ...], "prompts": [...], "labels": [...]} answers
{"rewards": [...]}: each query's score at its last token (eos appended). GET /health answers
200 once the model is loaded. ``--normalize_reward`` applies (r - mean) / std with the ``mean``
and ``std`` the reward-model trainer saved in the model's config.json. SIGTERM / Ctrl-C stop it.
"""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

from engine.cli.options import group, parse_job
from engine.inference.reward_server import RewardServerConfig, RewardService, make_server, server_url


@dataclass(kw_only=True)
class ServeRMJob:
    server: RewardServerConfig = group(title="reward server", aliases={"micro_batch_size": ("batch_size",)})


def parse_args(argv=None) -> RewardServerConfig:
    return parse_job(ServeRMJob, argv, description=__doc__).server


def _stop_on_sigterm() -> None:
    # serve_forever runs in this (main) thread: raising here ends it, like Ctrl-C does.
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def main(argv=None) -> None:
    config = parse_args(argv)
    service = RewardService(config)  # loads the model (and checks --normalize_reward) first
    server = make_server(config, service)
    _stop_on_sigterm()
    print(f"reward server for {config.reward_pretrain} listening on {config.host}:{server.server_address[1]}; "
          f"--remote_rm_url {server_url(server)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        print("reward server stopped", flush=True)


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:  # flag errors: one clear line, not a traceback
        sys.exit(f"serve_rm: {exc}")
