"""`compress devices`: see which device profiles exist and what each one asks of onnxruntime."""

from __future__ import annotations

from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

from compress import console
from devices.schema import DeviceProfile

PIPE_WIDTH = 200

GROUP_EPILOG = """\b
Examples:
  compress devices list
  compress devices show rpi4-cortex-a72
  compress devices show host --json
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


def profile_json(profile: DeviceProfile) -> dict[str, Any]:
    """A profile as JSON: the schema's fields plus where it came from (excluded from the dump itself)."""
    data = profile.model_dump(mode="json")
    data["source"] = str(profile.source) if profile.source is not None else None
    return data


def _ep_keys(profile: DeviceProfile) -> str:
    """Short EP keys in priority order ('tensorrt > cuda > cpu'): the ORT names overflow a table."""
    from runtime import providers

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
        from devices.host import describe_host

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
    from devices.loader import list_profiles

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
    from devices.loader import load_profile

    profile = load_profile(device)
    if as_json:
        data = profile_json(profile)
        if profile.detect:
            from devices.host import describe_host

            data["host"] = describe_host()
        console.emit_json(data)
        return
    console.out_console.print(_show_text(profile).rstrip("\n"), markup=False, highlight=False, soft_wrap=True)
