"""SSH transport for profiling and probing on the real device.

Why OpenSSH's own client (`ssh`/`scp` in a subprocess) and not a Python SSH library (paramiko, asyncssh):

* No new dependency: every machine that can reach a device over SSH already has the client.
* The user's setup keeps working unchanged: ~/.ssh/config (Host aliases, User, Port, ProxyJump,
  ControlMaster), ssh-agent, hardware keys, certificates. It is the same ssh they type by hand.
* Host-key checking is OpenSSH's own, so its semantics are exactly the ones users know: the same
  known_hosts files, hashed entries, `[host]:port` lines, @cert-authority and @revoked markers, and the same
  refusal. Nothing here parses known_hosts, so nothing here can get that subtly wrong.

Every call runs with BatchMode=yes (never a password or passphrase prompt that would hang a job),
StrictHostKeyChecking=yes (an unknown or changed host key is refused; never `no` or `accept-new`),
UpdateHostKeys=no (this tool never writes known_hosts), ConnectTimeout, ServerAliveInterval/CountMax (a
device that vanishes mid-run is noticed within ~15 s), no agent/X11/port forwarding, and with an identity,
`-i KEY -o IdentitiesOnly=yes` (only that key is offered). With --known-hosts FILE, FILE is the only
known_hosts consulted (the global one too is set aside), so the pin is exactly what the user named.

A remote profile copies the model (and the external-data files it references) and `runner.py` into a
private folder made by `mktemp -d` (mode 700, under the device's $TMPDIR or /tmp), runs the runner there
with the config on stdin, and removes the folder afterwards: on success, on failure and on Ctrl-C. ssh
failures (exit status 255) become one-line DeviceErrors that say what to do.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from compress.core import DeviceError, EdgeError, InputError, UsageError, warn
from devices import RemoteSpec
from runtime.runner import all_tensors
from runtime.stream import parse_output, stream_process

RUNNER = Path(__file__).with_name("runner.py")
PROBE = Path(__file__).with_name("device_probe.py")

CONNECT_TIMEOUT_S = 10
ALIVE_INTERVAL_S = 5
ALIVE_COUNT_MAX = 3  # a silent device is declared lost after ALIVE_INTERVAL_S * ALIVE_COUNT_MAX seconds
COMMAND_TIMEOUT_S = 60  # mktemp, probe: small commands
CLEANUP_TIMEOUT_S = 20
UPLOAD_BASE_S = 60
UPLOAD_MIN_BYTES_PER_S = 256 * 1024  # slow Wi-Fi to a Pi still beats this
DEFAULT_PORT = 22

# Remote file names are fixed (the model is always model.onnx); external data keeps the name the model uses.
REMOTE_MODEL = "model.onnx"
RESERVED = {REMOTE_MODEL, "runner.py", "pid"}
_SAFE_REL = re.compile(r"^[A-Za-z0-9._+-]+(/[A-Za-z0-9._+-]+)*$")
_SAFE_DIR = re.compile(r"^/[A-Za-z0-9._+@/-]+$")
_HOST = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@+-]*$")


# ------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    user: Optional[str]
    host: str
    port: int = DEFAULT_PORT

    @property
    def destination(self) -> str:
        """ssh's destination argument (the port travels as -p)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def scp_host(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    @property
    def known_hosts_name(self) -> str:
        """The host as known_hosts names it: `[host]:port` off port 22."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}:{self.port}"


def parse_target(text: str) -> Target:
    """`user@host[:port]`, `host`, or `user@[v6addr]:port`; anything that could pass as an ssh option is refused."""
    user, host, port = _parse_target(text)
    return Target(user, host, DEFAULT_PORT if port is None else port)


def _parse_target(text: str) -> tuple[Optional[str], str, Optional[int]]:
    raw = str(text).strip()
    bad = UsageError(f"--remote {text!r}: expected USER@HOST[:PORT] (e.g. pi@192.168.1.20 or pi@raspberrypi.local:2222)")
    if not raw or any(c.isspace() for c in raw):
        raise bad
    user, sep, rest = raw.rpartition("@")
    if sep and not _USER.match(user):
        raise UsageError(f"--remote {text!r}: {user!r} is not a valid user name")
    port = None
    if rest.startswith("["):  # [v6]:port or [v6]
        host, close, tail = rest[1:].partition("]")
        if not close or not _IPV6.match(host) or (tail and not tail.startswith(":")):
            raise bad
        port_text = tail[1:] if tail else None
    elif rest.count(":") > 1:  # a bare IPv6 address, no port
        host, port_text = rest, None
        if not _IPV6.match(host):
            raise bad
    else:
        host, _, port_text = rest.partition(":")
        port_text = port_text if ":" in rest else None
        if not _HOST.match(host or "-"):
            raise bad
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise UsageError(f"--remote {text!r}: port {port_text!r} is not a number from 1 to 65535")
        port = int(port_text)
    return user or None, host, port


def resolve_spec(base: Optional[RemoteSpec], *, target: Optional[str] = None, identity: Optional[str] = None,
                 known_hosts: Optional[str] = None, python: Optional[str] = None,
                 base_dir: Optional[Path] = None) -> Optional[RemoteSpec]:
    """The profile's `remote:` with command-line flags laid over it, field by field; None when neither names a host.

    Relative identity/known_hosts paths in a YAML are taken relative to the YAML's folder (base_dir), so a
    device file and its keys can live together; on the command line, relative to the working directory.
    """
    if target is None and base is None:
        given = [flag for flag, v in (("--identity", identity), ("--known-hosts", known_hosts), ("--remote-python", python)) if v]
        if given:
            raise UsageError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --remote USER@HOST (or a device "
                             "profile with a remote: section)")
        return None
    data: dict[str, Any] = {}
    if base is not None:
        data = base.model_dump()
        for key in ("identity", "known_hosts"):
            if data.get(key):
                data[key] = str(_abs(data[key], base_dir))
    if target is not None:
        user, host, port = _parse_target(target)
        same_host = base is not None and base.host == host  # then what the flag leaves out comes from the YAML
        data.update(host=host, port=port or (data.get("port") if same_host else None) or DEFAULT_PORT,
                    user=user or (data.get("user") if same_host else None))
    elif base is not None:
        check_spec_target(base)
    for key, value in (("identity", identity), ("known_hosts", known_hosts)):
        if value:
            data[key] = str(_abs(value, None))
    if python:
        data["python"] = python
    return RemoteSpec.model_validate(data)


def check_spec_target(spec: RemoteSpec) -> None:
    """A YAML's (or a library caller's) host and user get the checks a --remote flag gets: nothing option-like."""
    try:
        user, host, port = _parse_target(f"{spec.user + '@' if spec.user else ''}{spec.host}")
    except UsageError:
        user, host, port = None, "", None
    if host != spec.host or user != spec.user or port is not None:
        raise DeviceError(f"remote host {spec.host!r} / user {spec.user!r} is not a plain host name or address and user name; "
                          "put the port in remote.port and the user in remote.user")


def _abs(path: str, base_dir: Optional[Path]) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = (base_dir or Path.cwd()) / p
    return p


def _ssh_option_path(path: str) -> str:
    """ssh splits option values on spaces and expands %-tokens: quote and escape a file name for -o/-i."""
    escaped = path.replace("%", "%%")
    return f'"{escaped}"' if any(c.isspace() for c in escaped) else escaped


def _shell_path(path: str) -> str:
    """A path for the remote shell: quoted, but `~/x` still meaning the remote user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


# ----------------------------------------------------------------------------------------------- ssh


class Ssh:
    """ssh/scp command lines for one target, run with timeouts, failures mapped onto one-line DeviceErrors."""

    def __init__(self, spec: RemoteSpec, connect_timeout: int = CONNECT_TIMEOUT_S) -> None:
        check_spec_target(spec)
        self.spec = spec
        self.target = Target(spec.user, spec.host, spec.port)
        self.connect_timeout = connect_timeout
        self.identity = self._local_file(spec.identity, "identity file (--identity)") if spec.identity else None
        if self.identity and _looks_public(self.identity):
            raise InputError(f"identity file {self.identity} is a public key: pass the private key (the file without .pub)")
        self.known_hosts = self._local_file(spec.known_hosts, "known_hosts file (--known-hosts)") if spec.known_hosts else None
        for tool in ("ssh", "scp"):
            if shutil.which(tool) is None:
                raise DeviceError(f"the OpenSSH client ({tool}) is not installed on this machine: install openssh-client")

    @staticmethod
    def _local_file(path: str, what: str) -> str:
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(f"{what} {p} not found")
        if not p.is_file():
            raise InputError(f"{what} {p} is not a file")
        return str(p.resolve())

    # -- command lines

    @property
    def known_hosts_text(self) -> str:
        return self.known_hosts or "~/.ssh/known_hosts"

    def options(self) -> list[str]:
        """Options shared by ssh and scp (the port is not: ssh says -p, scp -P)."""
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
                "-o", f"ConnectTimeout={self.connect_timeout}",
                "-o", f"ServerAliveInterval={ALIVE_INTERVAL_S}", "-o", f"ServerAliveCountMax={ALIVE_COUNT_MAX}",
                "-o", "ForwardAgent=no", "-o", "ForwardX11=no", "-o", "ClearAllForwardings=yes"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={_ssh_option_path(self.known_hosts)}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if self.identity:
            opts += ["-i", _ssh_option_path(self.identity), "-o", "IdentitiesOnly=yes"]
        return opts

    def _port(self, flag: str) -> list[str]:
        # port 22 is left to ~/.ssh/config, so a Host alias with its own Port keeps working
        return [flag, str(self.target.port)] if self.target.port != DEFAULT_PORT else []

    def ssh_command(self, remote_cmd: str) -> list[str]:
        return ["ssh", "-T", *self.options(), *self._port("-p"), "--", self.target.destination, remote_cmd]

    def scp_command(self, local_files: list[Path], remote_dir: str) -> list[str]:
        # absolute local paths: scp reads `a:b` as a remote file, but never a name with a '/' before the ':'
        return ["scp", "-q", *self.options(), *self._port("-P"), "--", *[str(Path(f).resolve()) for f in local_files],
                f"{self.target.scp_host}:{remote_dir}"]

    @property
    def python(self) -> str:
        return _shell_path(self.spec.python)

    # -- running

    def run(self, remote_cmd: str, *, doing: str, input: Optional[str] = None, timeout: float = COMMAND_TIMEOUT_S,
            check: bool = True) -> subprocess.CompletedProcess:
        """One short ssh command; ssh's own failures (exit 255) always raise, the command's only with check."""
        return self._call(self.ssh_command(remote_cmd), doing=doing, input=input, timeout=timeout, check=check)

    def _call(self, cmd: list[str], *, doing: str, input: Optional[str], timeout: float, check: bool) -> subprocess.CompletedProcess:
        try:
            res = subprocess.run(cmd, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                                 capture_output=True, text=True, encoding="utf-8", errors="replace",
                                 timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.target} did not finish {doing} within {timeout:.0f} s (device overloaded or the link "
                              "too slow?)") from None
        except OSError as e:
            raise DeviceError(f"cannot run {cmd[0]}: {e.strerror or e}") from None
        if res.returncode == 255 or (cmd[0] == "scp" and res.returncode != 0 and _is_ssh_failure(res.stderr)):
            raise ssh_error(self, res.stderr, doing)
        if check and res.returncode != 0:
            raise self.command_error(res.returncode, res.stderr, doing)
        return res

    def command_error(self, rc: int, stderr: str, doing: str, python: bool = False) -> DeviceError:
        """The remote command failed (not ssh): the device's Python missing or too old (python=True), no disk space, ..."""
        last = _last_line(stderr)
        if python and rc == 127:
            return DeviceError(f"{self.spec.python!r} was not found on {self.target}: pass --remote-python PATH (or set "
                               "remote.python in the profile) to a Python >= 3.8 that has onnxruntime and numpy")
        if python and rc == 126:
            return DeviceError(f"{self.spec.python!r} cannot be executed on {self.target} ({last or 'permission denied'}): "
                               "pass --remote-python PATH to a working Python")
        if python and "SyntaxError" in stderr:
            return DeviceError(f"{self.spec.python!r} on {self.target} is too old for the device-side scripts (they need "
                               f"Python >= 3.8): {last}; pass --remote-python PATH")
        return DeviceError(f"{doing} on {self.target} failed (exit status {rc}){': ' + last if last else ''}")

    # -- folder lifecycle

    @contextmanager
    def temp_dir(self, subdirs: tuple[str, ...] = ()) -> Iterator["RemoteDir"]:
        """A private folder on the device (mktemp -d: mode 700), removed afterwards whatever happens."""
        mk = ['umask 077', 'd=$(mktemp -d "${TMPDIR:-/tmp}/edge-compress.XXXXXXXXXX")', 'cd "$d"']
        mk += [f"mkdir -p {shlex.quote(s)}" for s in subdirs]
        mk.append('printf "%s\\n" "$d"')
        res = self.run(" && ".join(mk), doing="creating a temporary folder")
        path = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
        if not _SAFE_DIR.match(path) or "/../" in path or "edge-compress." not in path:
            raise DeviceError(f"mktemp on {self.target} returned {path!r}, not a folder this tool will use (set TMPDIR on the "
                              "device to a plain path)")
        rd = RemoteDir(path)
        try:
            yield rd
        finally:
            self._remove(rd)

    def _remove(self, rd: "RemoteDir") -> None:
        d = shlex.quote(rd.path)
        # stop a runner we abandoned (timeout, Ctrl-C, lost link): without a pty, sshd does not signal it. The
        # pid is only trusted while that process still runs in our folder, so a recycled pid is never killed.
        kill = (f'p=$(cat {d}/pid 2>/dev/null) && r=$(cd {d} && pwd -P) && '
                f'{{ [ ! -d /proc/self ] || [ "$(readlink /proc/$p/cwd 2>/dev/null)" = "$r" ]; }} && kill "$p" 2>/dev/null; '
                ) if rd.abandoned else ""
        try:
            self.run(f"{kill}rm -rf {d}", doing="removing the temporary folder", timeout=CLEANUP_TIMEOUT_S)
        except EdgeError as e:
            _warn(f"could not remove {rd.path} on {self.target} ({e}); remove it by hand")
        except KeyboardInterrupt:
            _warn(f"interrupted while removing {rd.path} on {self.target}; remove it by hand")
            raise

    def upload(self, files: list[tuple[Path, str]], remote_dir: str) -> None:
        """Copy (local file, name relative to remote_dir) pairs, one scp per destination folder."""
        by_dir: dict[str, list[Path]] = {}
        renames: list[tuple[str, str]] = []
        for local, rel in files:
            folder = os.path.dirname(rel)
            by_dir.setdefault(folder, []).append(local)
            if os.path.basename(rel) != local.name:
                renames.append((os.path.join(folder, local.name), rel))
        size = sum(Path(f).stat().st_size for f, _ in files)
        timeout = UPLOAD_BASE_S + size / UPLOAD_MIN_BYTES_PER_S
        for folder, locals_ in by_dir.items():
            dest = remote_dir + "/" + (folder + "/" if folder else "")
            self._call(self.scp_command(locals_, dest), doing="copying the model", input=None, timeout=timeout, check=True)
        if renames:
            mv = " && ".join(f"mv -f -- {shlex.quote(a)} {shlex.quote(b)}" for a, b in renames)
            self.run(f"cd {shlex.quote(remote_dir)} && {mv}", doing="placing the copied files")


def _looks_public(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False  # ssh will say why
    return head.startswith((b"ssh-", b"ecdsa-", b"sk-ssh-", b"sk-ecdsa-"))


@dataclass
class RemoteDir:
    path: str
    abandoned: bool = False  # a runner may still be running in it: the cleanup stops it first


def _warn(msg: str) -> None:
    warn(msg)


# --------------------------------------------------------------------------------------- error mapping

_LOST = ("Timeout, server not responding", "closed by remote host", "Connection reset", "Broken pipe",
         "client_loop: send disconnect", "Connection closed by")


def _is_ssh_failure(stderr: str) -> bool:
    marks = ("Host key verification failed", "Permission denied (", "Connection refused", "timed out",
             "Could not resolve hostname", "No route to host", "Network is unreachable", *_LOST)
    return any(m in stderr for m in marks)


def _last_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.strip().startswith("@@@")]
    return lines[-1][:300] if lines else ""


def ssh_error(ssh: Ssh, stderr: str, doing: str) -> DeviceError:
    """ssh's diagnostics (exit status 255) as one line that says what happened and what to do."""
    t, kh = ssh.target, ssh.known_hosts_text
    scan = f"ssh-keyscan{' -p ' + str(t.port) if t.port != DEFAULT_PORT else ''} {t.host} >> {kh}"
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "has changed and you have requested strict checking" in stderr:
        fp = re.search(r"SHA256:[A-Za-z0-9+/=]+", stderr)
        seen = f" (it presented {fp.group(0).rstrip('.')})" if fp else ""
        return DeviceError(
            f"refusing {t}: its host key{seen} does not match the one in {kh} — the device was reinstalled, or someone is "
            f"intercepting the connection; if the change is expected, remove the old key (ssh-keygen -R '{t.known_hosts_name}' "
            f"-f {kh}), check the new fingerprint on the device, then add it: {scan}")
    if "Host key verification failed" in stderr or "host key is known for" in stderr:
        return DeviceError(
            f"refusing {t}: its host key is not in {kh} and unknown hosts are never trusted silently; check the "
            f"fingerprint the device shows (ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub, on the device) against "
            f"`ssh-keyscan{' -p ' + str(t.port) if t.port != DEFAULT_PORT else ''} {t.host} | ssh-keygen -lf -`, then add it: {scan}")
    if "UNPROTECTED PRIVATE KEY FILE" in stderr or "bad permissions" in stderr:
        return DeviceError(f"ssh ignores the identity file {ssh.identity}: its permissions are too open; run chmod 600 {ssh.identity}")
    if "Load key" in stderr and ("invalid format" in stderr or "error in libcrypto" in stderr):
        return DeviceError(f"ssh cannot load the identity file {ssh.identity}: not a private key (pass the private key, not the .pub)")
    if "Permission denied" in stderr:
        who = f"{t.user}@{t.host}" if t.user else t.host
        key = f"the key {ssh.identity}" if ssh.identity else "your keys (ssh-agent, ~/.ssh/id_*)"
        return DeviceError(f"{who} refused {key} (Permission denied): add the public key to the device's "
                           "~/.ssh/authorized_keys or pass --identity KEY; passwords are never asked (BatchMode)")
    if "Connection refused" in stderr:
        return DeviceError(f"cannot connect to {t}: connection refused — is sshd running on the device, on port {t.port}?")
    if "Could not resolve hostname" in stderr:
        return DeviceError(f"cannot resolve the host name {t.host!r}: check the spelling, or add it to ~/.ssh/config or /etc/hosts")
    if "No route to host" in stderr or "Network is unreachable" in stderr:
        return DeviceError(f"cannot reach {t}: {_reason(stderr, ('No route to host', 'Network is unreachable'))} — is the device "
                           "on this network?")
    if "Connection timed out" in stderr or "Operation timed out" in stderr or "timed out during banner exchange" in stderr:
        return DeviceError(f"cannot connect to {t}: no answer within {ssh.connect_timeout} s — is the device on and reachable "
                           "from here (firewall, VPN)?")
    for mark in _LOST:
        if mark in stderr:
            return DeviceError(f"lost the connection to {t} while {doing} ({_last_line(stderr)}); check the device's power "
                               "and network, then retry")
    last = _last_line(stderr)
    return DeviceError(f"ssh to {t} failed while {doing}{': ' + last if last else ' (no message from ssh)'}")


def _reason(stderr: str, marks: tuple[str, ...]) -> str:
    return next((m.lower() for m in marks if m in stderr), "unreachable")


# ------------------------------------------------------------------------------------------- profile


def model_files(model: Path) -> list[tuple[Path, str]]:
    """The model (as model.onnx) and every external-data file it references, by the name it references."""
    import onnx

    files = [(model, REMOTE_MODEL)]
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - check_model already refused unreadable files
        return files

    seen = set()
    for t in all_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((kv.value for kv in t.external_data if kv.key == "location"), None)
        if not loc or loc in seen:
            continue
        seen.add(loc)
        if not _SAFE_REL.match(loc) or ".." in loc.split("/") or loc in RESERVED:
            raise InputError(f"{model}: external data file name {loc!r} is not supported for remote profiling (use plain "
                             "names next to the model, e.g. what `compress export` writes)")
        local = model.parent / loc
        if not local.is_file():
            raise InputError(f"{model} keeps its weights in {local}, which is missing")
        files.append((local, loc))
    return files


def run_runner_remote(model: Path, config: dict[str, Any], spec: RemoteSpec, on_progress: Optional[Callable[..., None]] = None,
                      timeout: Optional[float] = None) -> dict[str, Any]:
    """runner.py on the device: copy, run with CONFIG on stdin (progress streams back on stderr), fetch, clean up."""
    ssh = Ssh(spec)
    files = model_files(model)
    subdirs = tuple(sorted({os.path.dirname(rel) for _, rel in files if os.path.dirname(rel)}))
    with ssh.temp_dir(subdirs) as rd:
        ssh.upload([*files, (RUNNER, "runner.py")], rd.path)
        # TMPDIR inside the folder: whatever onnxruntime or the hotspot pass writes there goes with it
        d = shlex.quote(rd.path)
        cmd = f"cd {d} && echo $$ > pid && TMPDIR={d} && export TMPDIR && exec {ssh.python} runner.py {REMOTE_MODEL} --config -"
        rd.abandoned = True  # until ssh reports the runner's own exit status
        run = stream_process(ssh.ssh_command(cmd), config, on_progress, timeout=timeout, new_session=True,
                             what="ssh")
        if run.timed_out:
            raise DeviceError(f"profiling on {ssh.target} did not finish within {timeout:.0f} s; the runner was stopped "
                              "(fewer --runs, a smaller --max-seconds, or a faster model?)")
        stderr = "\n".join(run.stderr_tail)
        if run.rc == 255:
            raise ssh_error(ssh, stderr, "profiling")
        rd.abandoned = run.rc < 0  # killed locally: the remote runner may live on
        if run.rc in (126, 127) or (run.rc != 0 and not run.stdout.strip() and "SyntaxError" in stderr):
            raise ssh.command_error(run.rc, stderr, "profiling", python=True)
        try:
            return parse_output(run.stdout, run.rc, run.last_line)
        except EdgeError as e:
            hint = ("; install onnxruntime and numpy for it on the device, or pass --remote-python PATH to a Python that has "
                    "them" if "is not installed for" in str(e) else "")
            raise type(e)(f"on {ssh.target}: {e}{hint}") from None


# --------------------------------------------------------------------------------------------- probe


def probe(spec: RemoteSpec) -> dict[str, Any]:
    """Facts about the device from device_probe.py, run by the device's Python from stdin (no files left behind)."""
    ssh = Ssh(spec)
    # a throwaway TMPDIR: onnxruntime may leave files in $TMPDIR on import, and the probe leaves nothing
    cmd = (f'd=$(mktemp -d "${{TMPDIR:-/tmp}}/edge-compress.XXXXXXXXXX") || exit 1; TMPDIR="$d" {ssh.python} -; '
           f'rc=$?; rm -rf "$d"; exit $rc')
    res = ssh.run(cmd, doing="probing the device", input=PROBE.read_text(encoding="utf-8"), check=False)
    if res.returncode != 0:
        raise ssh.command_error(res.returncode, res.stderr, "probing the device", python=True)
    try:
        facts = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DeviceError(f"the probe on {ssh.target} printed no result{': ' + _last_line(res.stderr) if res.stderr.strip() else ''}") from None
    if not isinstance(facts, dict):
        raise DeviceError(f"the probe on {ssh.target} printed something other than a JSON object")
    facts["target"] = str(ssh.target)
    return facts
