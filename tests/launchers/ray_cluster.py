"""A real multi-node Ray cluster on this one host, for tests: ``ray start --head`` plus
``ray start --address`` worker nodes, with a dashboard that takes ``ray job submit``.

Every port a second node on the same host would collide on is given per node, and the cluster
lives under short ``--temp-dir``s of its own (one per node). ``stop`` never calls ``ray stop`` (it kills every Ray
process on the machine, other users' clusters included): it kills the processes whose command
line names this cluster's temp dir or GCS port, and their descendants, by PID.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from parallel.ports import free_port

BIN = Path(sys.executable).parent


class LocalRayCluster:
    def __init__(self, *, num_nodes: int = 2, cpus_per_node: int = 1, object_store_bytes: int = 150_000_000):
        self.num_nodes, self.cpus_per_node, self.object_store_bytes = num_nodes, cpus_per_node, object_store_bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # AF_UNIX paths must stay < 108 bytes
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        # Ray 2.60 turns token auth on at `ray start --head`; a throwaway cluster opts out everywhere.
        # The job entrypoint's `python` is looked up on the PATH of `ray start`: the venv's first.
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)

    def node_temp_dir(self, node: int) -> Path:
        """Node ``node``'s --temp-dir (the head's is ``temp_dir``; the others' share its prefix, so the
        processes of every node match ``stop``'s pattern)."""
        return self.temp_dir if node == 0 else Path(f"{self.temp_dir}-n{node}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, *args: str, log: str) -> None:
        common = ["--num-cpus", str(self.cpus_per_node), "--object-store-memory", str(self.object_store_bytes),
                  "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()),
                  "--metrics-export-port", str(free_port())]
        with open(self.temp_dir / log, "w") as out:
            subprocess.run([str(BIN / "ray"), "start", *args, *common], env=self.env, stdout=out, stderr=out,
                           check=True, timeout=180)

    def start(self) -> "LocalRayCluster":
        self._ray_start("--head", "--port", str(self.gcs_port), "--temp-dir", str(self.temp_dir),
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                        "--ray-client-server-port", str(free_port()), log="head.log")
        for node in range(1, self.num_nodes):
            # A temp dir per node, as on real hosts: nodes sharing one unpacked a submitted job's
            # working_dir into the one directory the driver was importing from (ModuleNotFoundError).
            self._ray_start("--address", self.address, "--temp-dir", str(self.node_temp_dir(node)),
                            log=f"node{node}.log")
        self.wait_for_nodes()
        return self

    def alive_nodes(self) -> list[str]:
        """The IDs of the cluster's alive nodes, as its dashboard (the one ``ray job submit`` talks to)
        lists them; none while the dashboard does not answer yet. An HTTP request: no Python process
        that imports Ray and joins the cluster per look."""
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/v0/nodes?limit=100", timeout=10) as response:
                payload = json.load(response)
        except (OSError, ValueError):  # not listening yet, or not ready to answer
            return []
        rows = ((payload.get("data") or {}).get("result") or {}).get("result") or []
        return [row["node_id"] for row in rows if row.get("state") == "ALIVE"]

    def wait_for_nodes(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) < self.num_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.num_nodes} Ray nodes not alive after {timeout_s:.0f} s")
            time.sleep(0.5)

    def submit(self, entrypoint: list[str], *, runtime_env_json: str, timeout_s: float = 600):
        command = [str(BIN / "ray"), "job", "submit", "--address", self.dashboard,
                   "--runtime-env-json", runtime_env_json, "--", *entrypoint]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s)

    # ----- stopping what this cluster started, by PID ------------------------------------------
    def _own_pids(self) -> set[int]:
        marks = re.compile(rf"{re.escape(str(self.temp_dir))}|:{self.gcs_port}(\D|$)")
        parents: dict[int, int] = {}
        roots: set[int] = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = (proc / "status").read_text()
            except OSError:
                continue
            pid = int(proc.name)
            parents[pid] = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if marks.search(cmdline):
                roots.add(pid)
        owned, changed = set(roots), True
        while changed:
            changed = False
            for pid, parent in parents.items():
                if parent in owned and pid not in owned:
                    owned.add(pid)
                    changed = True
        return owned

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False

    def stop(self, grace_s: float = 3.0) -> None:
        pids = self._own_pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while any(self._alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.2)
        for node in range(self.num_nodes):
            shutil.rmtree(self.node_temp_dir(node), ignore_errors=True)
