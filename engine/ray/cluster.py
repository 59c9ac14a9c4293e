"""Joining the Ray cluster the driver runs on: a running one (``RAY_ADDRESS``, which ``ray job
submit`` sets for its drivers) or a local one started here.

An address that nothing answers is refused within seconds (Ray itself would retry for a
minute before a long traceback). Workers must import this project: under ``ray job submit
--runtime-env-json '{"working_dir": ...}'`` the job's environment ships the code to every node;
otherwise the driver's working directory is put on the workers' ``PYTHONPATH`` (a shared
filesystem or a one-node run).
"""
from __future__ import annotations

import json
import os
import socket
from urllib.parse import urlparse

import ray

from parallel.launch import LaunchError

# The variable the job supervisor hands its driver the submitted job config in (Ray 2.60).
JOB_CONFIG_VARIABLE = "RAY_JOB_CONFIG_JSON_ENV_VAR"
CONNECT_TIMEOUT_S = 10.0
STARTUP_ATTEMPTS = 3


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a GCS address (``host:port`` or ``ray://host:port``); None for ``auto``."""
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.scheme in ("http", "https"):
        raise LaunchError(f"RAY_ADDRESS={address} is a dashboard address (what `ray job submit --address` takes); "
                          "the driver joins the cluster at its GCS address, host:port (6379 unless `ray start "
                          "--head --port` said otherwise), or run it with `ray job submit`")
    if parsed.hostname is None or parsed.port is None:
        raise LaunchError(f"RAY_ADDRESS={address} is not host:port")
    return parsed.hostname, parsed.port


def check_address(address: str | None) -> None:
    """Raise ``LaunchError`` naming ``RAY_ADDRESS`` unless something listens there."""
    target = _host_port(address) if address else None
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise LaunchError(f"RAY_ADDRESS={address}: no Ray cluster answers there ({exc}); start one with "
                          "`ray start --head`, or unset RAY_ADDRESS to run on a Ray instance of this machine") from None


def _job_runtime_env() -> dict:
    """The runtime env of the job this driver was submitted as (empty when not submitted)."""
    if JOB_CONFIG_VARIABLE not in os.environ:
        return {}
    config = ray.job_config.JobConfig.from_json(json.loads(os.environ[JOB_CONFIG_VARIABLE]))
    return dict(config.runtime_env or {})


def driver_runtime_env() -> dict | None:
    """What this driver adds to its workers' environment: the code's location, unless the job ships it."""
    job = _job_runtime_env()
    if job.get("working_dir") or job.get("py_modules") or "PYTHONPATH" in (job.get("env_vars") or {}):
        return None
    return {"env_vars": {"PYTHONPATH": os.getcwd()}}


def join_cluster(*, log_to_driver: bool = True) -> None:
    """Connect to ``RAY_ADDRESS`` (checked first) or start a Ray instance on this machine.
    ``log_to_driver=False``: the actors' output stays in the session's log files."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    check_address(address)
    init_ray(address=address, include_dashboard=False, runtime_env=driver_runtime_env(), log_to_driver=log_to_driver)
    _reenter_working_directory()


def init_ray(**kwargs) -> None:
    """``ray.init(**kwargs)``, again when a Ray instance started here timed out: Ray 2.x gives a new
    raylet a fixed 30 s to register, which a loaded machine can miss (any other error raises)."""
    for attempt in range(STARTUP_ATTEMPTS):
        try:
            ray.init(**kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a plain Exception for this
            if "timed out during startup" not in str(exc) or attempt == STARTUP_ATTEMPTS - 1:
                raise
            ray.shutdown()


def _reenter_working_directory() -> None:
    """Ray 2.x: under ``ray job submit``, ray.init may unpack the job's working_dir anew at the same
    path, leaving this process in a deleted directory (``os.getcwd()`` raises): enter the new one."""
    try:
        os.getcwd()
    except FileNotFoundError:
        pwd = os.environ.get("PWD", "")
        os.chdir(pwd if os.path.isdir(pwd) else os.path.expanduser("~"))


def session_log_dir() -> str | None:
    """This machine's log directory of the Ray session (the actors' stdout / stderr files)."""
    try:
        return ray._private.worker._global_node.get_logs_dir_path()  # Ray 2.x: no public accessor
    except AttributeError:
        return None
