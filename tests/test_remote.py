"""Remote profiling over SSH, against a real OpenSSH server on 127.0.0.1 with throwaway keys.

The server is Debian's sshd (openssh-server), run in the foreground by a session fixture with its own host key,
authorized_keys, pid file and config, on a free loopback port. Sessions get TMPDIR (sshd's SetEnv) pointing at
a folder of the test's, so every test can check that nothing is left behind on the "device". The device's Python
is this venv's (it has onnxruntime and numpy): --remote-python, as a user would pass the device's venv.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from compress.core.errors import UsageError
from devices.schema import RemoteSpec
from runtime import remote

SSHD = "/usr/sbin/sshd"

PY = sys.executable
FAST = ["--runs", "8", "--warmup", "1"]


@dataclass
class Server:
    port: int
    user: str
    identity: Path
    known_hosts: Path  # holds the server's real host key
    other_key: Path  # a key the server neither has nor accepts
    remote_tmp: Path  # the sessions' TMPDIR
    log: Path
    pid: int  # the listening sshd; each connection is served by a child of it

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    def args(self, known_hosts: Path | None = None, identity: Path | None = None) -> list[str]:
        return ["--remote", self.target, "--identity", str(identity or self.identity),
                "--known-hosts", str(known_hosts or self.known_hosts), "--remote-python", PY]

    def leftovers(self) -> list[str]:
        return sorted(os.listdir(self.remote_tmp))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    missing = (f"{SSHD} is absent: install openssh-server to run the SSH tests (CI installs it)"
               if not os.path.exists(SSHD) else
               "the OpenSSH client (ssh, ssh-keygen) is absent: install openssh-client"
               if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None else None)
    if missing:  # CI sets EDGE_COMPRESS_REQUIRE_SSHD, so a lost install step fails there instead of skipping
        (pytest.fail if os.environ.get("EDGE_COMPRESS_REQUIRE_SSHD") else pytest.skip)(missing)
    root = tmp_path_factory.mktemp("sshd")
    host_key = _keygen(root / "host_ed25519", "test-host")
    user_key = _keygen(root / "user_ed25519", "test-user")
    other = _keygen(root / "other_ed25519", "test-other")
    (root / "authorized_keys").write_text(Path(f"{user_key}.pub").read_text())
    remote_tmp = root / "remote-tmp"
    remote_tmp.mkdir()
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd run as root needs its privilege-separation folder, which a booted system's unit creates
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    for attempt in range(3):  # the port may be taken between choosing it and sshd binding it
        port = _free_port()
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
            f"PidFile {root / 'sshd.pid'}", "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp", f"SetEnv TMPDIR={remote_tmp}", "PrintMotd no", "LogLevel INFO", "",
        ]))
        log = root / "sshd.log"
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                stderr=open(log, "w"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"sshd did not start: {log.read_text()[-2000:]}")
    kh = root / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text()}")
    try:
        yield Server(port, getpass.getuser(), user_key, kh, other, remote_tmp, log, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """resnet_tiny as `compress export` writes it, and a copy with its weights in an external-data file."""
    root = tmp_path_factory.mktemp("remote-models")
    plain = root / "m.onnx"
    r = subprocess.run([PY, "-m", "compress.cli", "export", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32",
                        "-o", str(plain)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ext = root / "ext" / "m_ext.onnx"
    ext.parent.mkdir()
    onnx.save_model(onnx.load(str(plain)), str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m_ext.onnx.data", size_threshold=1024)
    assert (ext.parent / "m_ext.onnx.data").stat().st_size > 100_000
    return {"plain": plain, "ext": ext}


def _cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "compress.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _device_yaml(path: Path, sshd: Server, **remote_over) -> Path:
    import platform

    from devices.host import normalize_arch

    eps = remote_over.pop("eps", ["cpu"])
    fallback = remote_over.pop("cpu_fallback", True)
    spec = {"host": "127.0.0.1", "user": sshd.user, "port": sshd.port, "identity": str(sshd.identity),
            "known_hosts": str(sshd.known_hosts), "python": PY, **remote_over}
    lines = ["name: loopback-dev", "description: this machine, reached over SSH", f"arch: {normalize_arch(platform.machine())}",
             "cores: 1", "threads: 1", "execution_providers:", *[f"  - name: {e}" for e in eps],
             f"cpu_fallback: {'true' if fallback else 'false'}", "remote:",
             *[f"  {k}: {json.dumps(v)}" for k, v in spec.items()]]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------- transport units


def test_parse_target_forms_and_refusals():
    assert remote.parse_target("pi@10.0.0.7:2222") == remote.Target("pi", "10.0.0.7", 2222)
    assert remote.parse_target("board.local") == remote.Target(None, "board.local", 22)
    assert remote.parse_target("me@[::1]:2200") == remote.Target("me", "::1", 2200)
    assert str(remote.Target("me", "::1", 2200)) == "me@[::1]:2200"
    for bad in ("", "pi@", "-oProxyCommand=sh", "pi@-oProxyCommand=x", "pi@host:0", "pi@host:99999", "pi@host:x",
                "a b@host", "pi@ho st", "-l@host"):
        with pytest.raises(UsageError):
            remote.parse_target(bad)


def test_ssh_command_always_verifies_host_keys(tmp_path):
    if shutil.which("ssh") is None or shutil.which("scp") is None:
        pytest.skip("the OpenSSH client is absent: install openssh-client")
    key, kh = tmp_path / "id key", tmp_path / "kh"
    key.write_text("x")
    kh.write_text("")
    ssh = remote.Ssh(RemoteSpec(host="10.0.0.7", user="pi", port=2222, identity=str(key), known_hosts=str(kh)))
    cmd = ssh.ssh_command("true")
    opts = " ".join(cmd)
    for need in ("BatchMode=yes", "StrictHostKeyChecking=yes", f"UserKnownHostsFile={kh}", "GlobalKnownHostsFile=/dev/null",
                 "IdentitiesOnly=yes", "ConnectTimeout=", "ServerAliveInterval=", "ServerAliveCountMax=", "UpdateHostKeys=no"):
        assert need in opts
    assert "accept-new" not in opts and "StrictHostKeyChecking=no" not in opts
    assert cmd[cmd.index("-i") + 1] == f'"{key}"'  # a space in the path stays one ssh argument
    assert cmd[cmd.index("-p") + 1] == "2222" and cmd[-3:] == ["--", "pi@10.0.0.7", "true"]
    scp = ssh.scp_command([tmp_path / "a:b.onnx"], "/tmp/x/")
    assert scp[scp.index("-P") + 1] == "2222" and scp[-1] == "pi@10.0.0.7:/tmp/x/" and scp[-2].startswith("/")
    assert "-p" not in remote.Ssh(RemoteSpec(host="pi")).ssh_command("true")  # port 22: left to ~/.ssh/config


def test_flags_override_yaml_remote(tmp_path):
    base = RemoteSpec(host="board", user="pi", port=2222, identity="keys/id", python="/opt/py")
    spec = remote.resolve_spec(base, base_dir=tmp_path)
    assert spec.identity == str(tmp_path / "keys/id") and spec.python == "/opt/py"
    spec = remote.resolve_spec(base, target="board:2200", python="python3.11", base_dir=tmp_path)
    assert (spec.user, spec.host, spec.port, spec.python) == ("pi", "board", 2200, "python3.11")
    assert remote.resolve_spec(base, target="root@other").user == "root"
    assert remote.resolve_spec(None) is None
    with pytest.raises(UsageError, match="--identity"):
        remote.resolve_spec(None, identity="k")


# ---------------------------------------------------------------------------------------- over sshd


def test_profile_over_ssh_reports_the_device(sshd, models):
    r = _cli("profile", str(models["plain"]), "--device", "host", *sshd.args(), *FAST, "--json", "-")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert "detected on THIS machine" in r.stderr  # `host` describes this machine, not the device
    assert doc["measured_on"] == "remote" and doc["model"] == str(models["plain"])
    rem = doc["remote"]
    import onnxruntime as ort

    assert rem["target"] == sshd.target and rem["python"] == PY and rem["onnxruntime"] == ort.__version__
    assert "CPUExecutionProvider" in rem["providers_available"] and rem["cpu_count"] >= 1
    assert doc["host"]["remote"] == sshd.target and doc["host"]["onnxruntime"] == ort.__version__
    assert doc["client"]["arch"] in ("x86_64", "arm64")  # this machine, named as such
    assert doc["runs"] == 8 and 0 < doc["latency_ms"]["p50"] <= doc["latency_ms"]["p99"]
    assert doc["providers"] == ["CPUExecutionProvider"] and doc["fallback"] is False
    assert sshd.leftovers() == []


def test_device_yaml_with_remote_and_external_data(sshd, models, tmp_path):
    # identity and known_hosts relative to the YAML's folder, as a device file kept beside its keys would say
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(sshd.identity, keys / "id")
    os.chmod(keys / "id", 0o600)
    shutil.copy(sshd.known_hosts, keys / "kh")
    dev = _device_yaml(tmp_path / "dev.yaml", sshd, identity="keys/id", known_hosts="keys/kh",
                       eps=["tensorrt", "cpu"], cpu_fallback=True)
    out = tmp_path / "p.json"
    r = _cli("profile", str(models["ext"]), "--device", str(dev), *FAST, "--json", str(out), cwd=Path("/"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["remote"]["target"] == sshd.target and doc["latency_ms"]["p50"] > 0
    # the device's onnxruntime decided: no TensorRT there, so CPU, said loudly
    assert doc["fallback"] is True and doc["missing_providers"] == ["TensorrtExecutionProvider"]
    assert doc["requested_providers"] == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert "lacks" in r.stderr and "TensorrtExecutionProvider" in r.stderr
    assert doc["model_size_bytes"] > (models["ext"].parent / "m_ext.onnx.data").stat().st_size  # the data went too
    assert sshd.leftovers() == []

    strict = _device_yaml(tmp_path / "strict.yaml", sshd, eps=["tensorrt"], cpu_fallback=False)
    r = _cli("profile", str(models["plain"]), "--device", str(strict), *FAST)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "TensorrtExecutionProvider" in line and "cpu_fallback" in line and sshd.target in line
    assert sshd.leftovers() == []


def test_unknown_host_key_is_refused(sshd, models, tmp_path):
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    r = _cli("profile", str(models["plain"]), *sshd.args(known_hosts=empty), *FAST)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "known_hosts" in line and "not in" in line
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in line
    assert empty.read_text() == "" and sshd.leftovers() == []  # nothing trusted, nothing written


def test_changed_host_key_is_refused(sshd, models, tmp_path):
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {Path(f'{sshd.other_key}.pub').read_text()}")
    before = wrong.read_text()
    r = _cli("profile", str(models["plain"]), *sshd.args(known_hosts=wrong), *FAST)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "does not match" in line and "SHA256:" in line and "ssh-keygen -R" in line
    assert wrong.read_text() == before and sshd.leftovers() == []


def test_connection_refused_and_wrong_key_fail_fast(sshd, models):
    closed = _free_port()
    t0 = time.monotonic()
    r = _cli("profile", str(models["plain"]), "--remote", f"{sshd.user}@127.0.0.1:{closed}", "--identity", str(sshd.identity),
             "--known-hosts", str(sshd.known_hosts), *FAST)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "connection refused" in line and str(closed) in line
    assert time.monotonic() - t0 < 20
    r = _cli("profile", str(models["plain"]), *sshd.args(identity=sshd.other_key), *FAST)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "Permission denied" in line and "--identity" in line


def test_missing_remote_python_is_explained_and_cleaned_up(sshd, models):
    args = sshd.args()
    args[args.index("--remote-python") + 1] = "/nonexistent/python3"
    r = _cli("profile", str(models["plain"]), *args, *FAST)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "/nonexistent/python3" in line and "--remote-python" in line
    assert sshd.leftovers() == []


def _start_endless_profile(sshd: Server, models) -> tuple[subprocess.Popen, int]:
    """A profile that would run for hours, and the remote runner's pid once it is running (in its private folder)."""
    proc = subprocess.Popen([PY, "-m", "compress.cli", "profile", str(models["plain"]), "--device", "x86-avx2", *sshd.args(),
                             "--runs", "100000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, pid_file = time.monotonic() + 30, None
    while time.monotonic() < deadline and pid_file is None and proc.poll() is None:
        found = list(sshd.remote_tmp.glob("edge-compress.*/pid"))
        pid_file = found[0] if found and found[0].read_text().strip() else None
        time.sleep(0.05)
    if pid_file is None:
        proc.kill()
        pytest.fail(f"the remote runner never started: {proc.communicate()[1]}")
    assert stat.S_IMODE(pid_file.parent.stat().st_mode) == 0o700  # private: mktemp -d
    time.sleep(0.5)  # into the timing loop
    return proc, int(pid_file.read_text())


def _assert_runner_gone(pid: int) -> None:
    deadline = time.monotonic() + 5  # the "device" is this machine: the abandoned runner must have been stopped
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or b"runner.py" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_ctrl_c_stops_the_remote_runner_and_cleans_up(sshd, models):
    proc, runner_pid = _start_endless_profile(sshd, models)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "interrupted" in err and "Traceback" not in err, err
    assert sshd.leftovers() == []
    _assert_runner_gone(runner_pid)


def test_lost_connection_is_a_clear_error_and_cleans_up(sshd, models):
    proc, runner_pid = _start_endless_profile(sshd, models)
    try:
        sessions = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == sshd.pid]
        assert sessions, "no sshd session process found"
        for pid in sessions:  # the server side of the connection dies: what a device losing power looks like to ssh
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    line = _one_error_line(err)
    assert proc.returncode == 1 and "lost the connection" in line and sshd.target in line
    assert sshd.leftovers() == []
    _assert_runner_gone(runner_pid)


def _ppid(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_probe_writes_a_valid_profile_that_profiles_remotely(sshd, models, tmp_path):
    from devices.loader import load_profile

    r = _cli("devices", "probe", *sshd.args(), "--name", "loopback")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "probed.yaml"
    path.write_text(r.stdout)
    prof = load_profile(str(path))
    from devices.host import detect

    h = detect()
    assert prof.name == "loopback" and prof.arch == h.arch and prof.isa == h.isa and prof.cores >= 1
    assert prof.provider_names[-1] == "CPUExecutionProvider"
    assert prof.remote is not None and (prof.remote.host, prof.remote.port, prof.remote.python) == ("127.0.0.1", sshd.port, PY)
    assert r.stdout.startswith(f"# probed from {sshd.target}") and "onnxruntime" in r.stdout
    r = _cli("profile", str(models["plain"]), "--device", str(path), *FAST, "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["remote"]["target"] == sshd.target
    assert sshd.leftovers() == []


def test_run_with_a_remote_device_profiles_there(sshd, tmp_path):
    shutil.copy(sshd.known_hosts, tmp_path / "kh")
    dev = _device_yaml(tmp_path / "dev.yaml", sshd, known_hosts="kh")  # relative to the YAML, not to the cwd
    out = tmp_path / "out"
    r = _cli("run", "compress.zoo:resnet_tiny", "--input-shape", "1,3,32,32", "--device", str(dev), "--quant", "none",
             "--runs", "8", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["remote"]["target"] == sshd.target and rep["host"]["remote"] == sshd.target
    assert rep["speedup_measure"].startswith("ratio of p50s") and sshd.target in rep["speedup_measure"]
    assert rep["variants"][0]["speedup_vs_fp32"] == 1.0 and rep["variants"][0]["latency_ms"]["p50"] > 0
    assert "remote" not in rep["device"]  # where the keys live is not the report's business
    assert f"remote, {sshd.target} over SSH" in (out / "report.md").read_text()
    assert sshd.leftovers() == []


def test_device_scripts_are_python38_and_stdlib_only():
    import ast

    allowed = set(sys.stdlib_module_names)
    for script, optional in ((remote.PROBE, {"onnxruntime", "numpy"}), (remote.RUNNER, {"onnxruntime", "numpy", "onnx"})):
        tree = ast.parse(script.read_text(), feature_version=(3, 8))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else [node.module.split(".")[0]]
                assert all(m in allowed | optional for m in mods), (script.name, mods)


PI_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
    f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n" for i in range(4))


def test_probe_facts_become_a_valid_arm_profile():
    from devices.probed import profile_from_probe

    facts = {"machine": "aarch64", "cpuinfo": PI_CPUINFO, "cores": 4, "hostname": "Pi4_Lab", "board": "Raspberry Pi 4 Model B",
             "os": "Debian GNU/Linux 12 (bookworm)", "providers": ["AzureExecutionProvider", "XnnpackExecutionProvider",
                                                                  "CPUExecutionProvider"]}
    prof = profile_from_probe(facts, RemoteSpec(host="10.0.0.7", user="pi"))
    assert (prof.name, prof.arch, prof.isa, prof.cores, prof.threads) == ("pi4_lab", "arm64", ["neon"], 4, 4)
    assert prof.provider_names == ["XnnpackExecutionProvider", "CPUExecutionProvider"]  # Azure is no compute device
    assert prof.quantization.activation_type == "int8" and prof.int8_dot is False and "Cortex-A72" in prof.description
    assert prof.remote == RemoteSpec(host="10.0.0.7", user="pi")
    from compress.core.errors import DeviceError

    with pytest.raises(DeviceError, match="armv7l"):
        profile_from_probe({**facts, "machine": "armv7l"}, RemoteSpec(host="pi"))


def test_remote_progress_lines_reach_the_caller(sshd, models):
    from devices.loader import load_profile
    from runtime.profiler import profile_model

    spec = RemoteSpec(host="127.0.0.1", user=sshd.user, port=sshd.port, identity=str(sshd.identity),
                      known_hosts=str(sshd.known_hosts), python=PY)
    seen: list[tuple] = []
    res = profile_model(models["plain"], load_profile("x86-avx2"), runs=20, warmup=2, threads=1, remote=spec,
                        on_progress=lambda *a: seen.append(a)).to_json()
    assert (2, 2, "warmup") in seen and (20, 20, "timing") in seen  # the device's stderr, forwarded by ssh
    assert res["measured_on"] == "remote" and res["remote"]["target"] == sshd.target
    assert sshd.leftovers() == []
