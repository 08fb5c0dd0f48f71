"""`compress devices`: see which device profiles exist and what each one asks of onnxruntime."""

from __future__ import annotations

from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

from compress.core import console
from devices import DeviceProfile

PIPE_WIDTH = 200

GROUP_EPILOG = """\b
Examples:
  compress devices list
  compress devices show rpi4-cortex-a72
  compress devices show host --json
  compress devices probe --remote pi@raspberrypi.local > my-pi.yaml
"""

LIST_EPILOG = """\b
Examples:
  compress devices list
  compress devices list --json > devices.json
"""

SHOW_EPILOG = """\b
Examples:
  compress devices show host
  compress devices show snapdragon-8gen2-qnn --json
  compress devices show ./my-board.yaml
"""

PROBE_EPILOG = """\b
Examples:
  compress devices probe --remote pi@raspberrypi.local > my-pi.yaml
  compress devices probe --remote pi@10.0.0.7:2222 --identity ~/.ssh/pi_ed25519 --remote-python /home/pi/venv/bin/python
  compress profile model.onnx --device my-pi.yaml        (profiles on the Pi: the YAML keeps the remote: section)
"""


def profile_json(profile: DeviceProfile) -> dict[str, Any]:
    """A profile as JSON: the schema's fields plus where it came from (excluded from the dump itself)."""
    data = profile.model_dump(mode="json")
    data["source"] = str(profile.source) if profile.source is not None else None
    return data


def _ep_keys(profile: DeviceProfile) -> str:
    """Short EP keys in priority order ('tensorrt > cuda > cpu'): the ORT names overflow a table."""
    from devices import providers

    return " > ".join(providers.resolve(name).key for name in profile.provider_names)


def _precision_flags(profile: DeviceProfile) -> str:
    flags = [flag for flag, on in (("int8", profile.int8_dot), ("fp8", profile.fp8)) if on]
    return ", ".join(flags) or "-"


class _FlowListDumper(yaml.SafeDumper):
    """Block-style mappings, but lists of scalars on one line (`isa: [neon, dotprod]`), as in the profiles."""


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def _profiles_table(profiles: list[DeviceProfile]) -> Table:
    table = Table(title=None, show_lines=False)
    for col in ("name", "arch", "EPs", "int8/fp8"):
        table.add_column(col, no_wrap=True)
    table.add_column("description")
    for p in profiles:
        table.add_row(p.name, p.arch, _ep_keys(p), _precision_flags(p), p.description)
    return table


def _show_text(profile: DeviceProfile) -> str:
    """YAML, so `show` output can be saved and edited into a new profile (minus the comment lines)."""
    header = [f"# source: {profile.source}"]
    if profile.detect:
        from devices import describe_host

        h = describe_host()
        header.append(f"# detected on this machine: {h['cpu']} ({h['arch']}, {h['cores']} usable cores, {h['os']})")
    body = yaml.dump(profile.model_dump(mode="json"), Dumper=_FlowListDumper, sort_keys=False, width=120)
    return "\n".join(header) + "\n" + body


def _print_wide(renderable: Any) -> None:
    """Print to stdout; when piped, at PIPE_WIDTH rather than rich's 80-column guess, which would fold
    every description into a one-word-per-line column. Piped output never carries colour codes."""
    out = console.out_console
    if out.is_terminal:
        out.print(renderable)
        return
    Console(file=out.file, width=PIPE_WIDTH, color_system=None, force_terminal=False, highlight=False).print(renderable)


@click.group("devices", epilog=GROUP_EPILOG)
def devices() -> None:
    """List and inspect device profiles (shipped ones, or your own YAML file)."""


@devices.command("list", epilog=LIST_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of every profile instead of a table.")
def list_cmd(as_json: bool) -> None:
    """List the shipped device profiles."""
    from devices import list_profiles

    profiles = list_profiles()
    if as_json:
        console.emit_json([profile_json(p) for p in profiles])
        return
    _print_wide(_profiles_table(profiles))


@devices.command("show", epilog=SHOW_EPILOG)
@click.argument("device", metavar="NAME|PATH.yaml")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def show_cmd(device: str, as_json: bool) -> None:
    """Show one device profile; for `host`, the values detected on this machine.

    NAME is a shipped profile (see `compress devices list`); PATH.yaml is your own profile file.
    """
    from devices import load_profile

    profile = load_profile(device)
    if as_json:
        data = profile_json(profile)
        if profile.detect:
            from devices import describe_host

            data["host"] = describe_host()
        console.emit_json(data)
        return
    console.out_console.print(_show_text(profile).rstrip("\n"), markup=False, highlight=False, soft_wrap=True)


@devices.command("probe", epilog=PROBE_EPILOG)
@click.option("--remote", "remote_target", required=True, metavar="USER@HOST[:PORT]", help="The device to probe, over SSH.")
@click.option("--identity", metavar="KEY", type=click.Path(dir_okay=False), default=None,
              help="Private key (ssh -i; only this key is offered).")
@click.option("--known-hosts", metavar="FILE", type=click.Path(dir_okay=False), default=None,
              help="Verify the device's host key against FILE only (default: ~/.ssh/known_hosts).")
@click.option("--remote-python", metavar="PATH", default=None, help="Python on the device (default python3); "
              "the one that has onnxruntime, to see its execution providers.")
@click.option("--name", default=None, help="Profile name (default: the device's host name).")
def probe_cmd(remote_target: str, identity: str | None, known_hosts: str | None, remote_python: str | None,
              name: str | None) -> None:
    """Print a device profile (YAML) for a machine reached over SSH: arch, ISA, cores, onnxruntime's EPs.

    A small Python script runs on the device (standard library; onnxruntime if installed); nothing is left
    there. The profile keeps a remote: section, so `compress profile/run --device FILE.yaml` profiles on the
    device. Review it before use: threads, opset and the EPs' options are starting points.
    """
    import re

    from compress.core import UsageError
    from devices import header_lines, profile_from_probe
    from runtime import probe, resolve_spec

    if name is not None and not re.match(r"^[a-z0-9][a-z0-9._-]*$", name):
        raise UsageError(f"--name {name!r}: use lowercase letters, digits, '.', '_' and '-', starting with a letter or digit")
    spec = resolve_spec(None, target=remote_target, identity=identity, known_hosts=known_hosts, python=remote_python)
    assert spec is not None
    with console.progress(f"probing {remote_target}"):
        facts = probe(spec)
    prof = profile_from_probe(facts, spec, name)
    body = yaml.dump(prof.model_dump(mode="json", exclude_none=True, exclude={"detect"}), Dumper=_FlowListDumper,
                     sort_keys=False, width=120)
    click.echo("\n".join(header_lines(facts)) + "\n" + body.rstrip("\n"))  # plain text: it is meant to be saved
