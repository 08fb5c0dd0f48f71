"""`compress search --address`: a real Ray cluster of two nodes on this machine, started with `ray start` as a
team would. The head advertises no device; the second node advertises the `host` device's resource, as the Ray
worker on (or attached to) a board does. Profiling must run on that node, the compression anywhere; a device that
no node advertises is refused in one line before any trial starts.

Both nodes and the CLI share one token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN): Ray 2.59+ turns token auth on for
local clusters, and a client without the cluster's token is refused."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_session(sid: int) -> None:
    """Every process of a `ray start --block` session (raylet, GCS, workers): SIGTERM alone leaves some behind."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat: the session id
                os.kill(int(stat.parent.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def _node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", "--num-cpus=1",
                             "--object-store-memory=100000000", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _ray_py(code: str, env: dict[str, str]) -> str:
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


@pytest.fixture(scope="module")
def cluster():
    """(address, env, id of the node holding the `host` resource); torn down whatever the tests did."""
    if not Path(RAY).exists():
        pytest.skip("no ray executable beside this Python")
    tmp = Path(tempfile.mkdtemp(prefix="ecray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes = [_node(["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={tmp}"], env, tmp / "head.log")]
    try:
        probe = f"import ray; ray.init(address={address!r}, logging_level=40, log_to_driver=False)\n"
        deadline = time.monotonic() + 90
        while True:  # the head takes a few seconds; then the device's node joins it
            try:
                if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=60).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            assert time.monotonic() < deadline, (tmp / "head.log").read_text()[-2000:]
            time.sleep(2)
        nodes.append(_node([f"--address={address}", '--resources={"host": 1}'], env, tmp / "device.log"))
        code = probe + ("import time\nfor _ in range(60):\n"
                        "    ids = [n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('host')]\n"
                        "    if ids: break\n    time.sleep(1)\nprint(ids[0] if ids else '')")
        device_node = _ray_py(code, env)
        assert device_node, (tmp / "device.log").read_text()[-2000:]
        yield address, env, device_node
    finally:
        for p in reversed(nodes):
            p.send_signal(signal.SIGTERM)
        for p in reversed(nodes):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            _kill_session(p.pid)
        shutil.rmtree(tmp, ignore_errors=True)


def _search(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", "search", "compress.zoo:resnet_tiny",
                           "--input-shape", "1,3,32,32", *args], env=env, capture_output=True, text=True, timeout=600)


def test_search_on_a_cluster_profiles_on_the_node_that_advertises_the_device(cluster, tmp_path):
    address, env, device_node = cluster
    r = _search(env, "--address", address, "--device", "host", "--trials", "2", "--seed", "0", "--runs", "3",
                "--prune-max", "0.3", "--latency-budget", "1000", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "search.json").read_text())
    assert len(s["trials"]) == 2
    done = [t for t in s["trials"] if t["status"] == "done"]
    assert done, s["trials"]  # the first is compress run's default: it finishes (the other may stop early)
    for t in done:
        assert t["profiled_on"] == device_node  # the timing ran where the device is, not on the head
        rep = json.loads(Path(t["report"]).read_text())
        assert rep["profiled_on"]["ray_node"] == device_node and rep["variants"][0]["latency_ms"]["p50"] > 0
    assert s["ray"]["address"] == address and s["ray"]["embedded"] is False
    assert s["recommended"] and (tmp_path / "out" / "best" / "report.json").exists()


def test_search_refuses_a_device_no_node_advertises(cluster, tmp_path):
    address, env, _ = cluster
    r = _search(env, "--address", address, "--device", "rpi4-cortex-a72", "--trials", "1", "-o", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "advertises the device resource 'rpi4-cortex-a72'" in line and "--resources" in line
    assert "Traceback" not in r.stderr and not (tmp_path / "o" / "search.json").exists()


def test_search_without_the_clusters_token_is_one_line(cluster, tmp_path):
    address, env, _ = cluster
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    r = _search(wrong, "--address", address, "--trials", "1", "-o", str(tmp_path / "o"))
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: --address {address}: the Ray cluster refused this "
                                                        "client's token")
    assert "InvalidAuthToken" not in r.stderr and "Traceback" not in r.stderr  # not Ray's line-a-second log
