"""Device profiles: the shipped YAML files, the loader's error messages, host detection, `compress devices`."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.core.errors import DeviceError, EdgeError, InputError
from devices import host
from devices.loader import PROFILES_DIR, list_profiles, load_profile, profile_names
from devices.schema import DeviceProfile

REQUIRED = {
    "host", "x86-avx2", "x86-avx512-vnni", "rpi4-cortex-a72", "arm64-cortex-a76", "arm64-neoverse-v1",
    "snapdragon-8gen2-qnn", "jetson-orin-trt", "apple-m2-coreml", "nvidia-h100-trt-fp8",
}

# ---------------------------------------------------------------- canned /proc/cpuinfo texts

X86_VNNI = """\
processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Platinum 8275CL CPU @ 3.00GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single pti fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid mpx avx512f avx512dq rdseed adx smap clflushopt clwb avx512cd avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves ida arat pku ospke avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8275CL CPU @ 3.00GHz
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni
"""

X86_AVX2 = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Core(TM) i7-8650U CPU @ 1.90GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch fsgsbase bmi1 avx2 smep bmi2 erms invpcid mpx rdseed adx smap clflushopt xsaveopt xsavec xgetbv1 xsaves
"""

ARM_A76 = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

processor\t: 1
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""

ARM_GRAVITON3 = """\
processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""

ARM_A72 = """\
processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def _write(tmp_path: Path, text: str, name: str = "board.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _valid_dict(name: str = "x86-avx2") -> dict:
    return yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())


# ---------------------------------------------------------------- shipped profiles


def test_shipped_profiles_all_load_and_names_match_files():
    names = profile_names()
    assert len(names) >= 10
    assert REQUIRED <= set(names)
    profiles = list_profiles()
    assert [p.name for p in profiles] == sorted(names)
    for p in profiles:
        assert isinstance(p, DeviceProfile)
        assert p.source is not None and Path(p.source).stem == p.name
        assert p.description.strip()


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_each_shipped_file_stem_equals_name(name):
    raw = _valid_dict(name)
    assert raw["name"] == name
    assert load_profile(name).name == name


@pytest.mark.parametrize(
    "name", ["x86-avx2", "x86-avx512-vnni", "x86-amx-sapphire-rapids", "rpi4-cortex-a72", "arm64-cortex-a76",
             "arm64-neoverse-n1", "arm64-neoverse-v1"])
def test_cpu_profiles_follow_the_isa_rules(name):
    """A CPU-only profile's INT8 and pruning prefs are exactly what its ISA implies; the YAML and the
    rules in devices.host must not drift apart."""
    p = load_profile(name)
    assert p.provider_names == ["CPUExecutionProvider"]
    assert p.quantization == host.quant_defaults(p.arch, p.isa)
    assert p.pruning.channel_multiple == host.channel_multiple(p.arch, p.isa)
    assert p.int8_dot == host.int8_dot(p.isa)


def test_accelerator_profiles():
    qnn = load_profile("snapdragon-8gen2-qnn")
    assert qnn.provider_names == ["QNNExecutionProvider", "CPUExecutionProvider"]
    assert qnn.execution_providers[0].options["backend_path"] == "libQnnHtp.so"
    assert qnn.quantization.format == "qdq" and qnn.quantization.activation_type == "uint8"
    assert qnn.int8_dot and qnn.cpu_fallback

    orin = load_profile("jetson-orin-trt")
    assert orin.provider_names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = orin.execution_providers[0].options
    assert trt["trt_fp16_enable"] is True and trt["trt_int8_enable"] is True
    assert orin.arch == "arm64" and not orin.fp8

    h100 = load_profile("nvidia-h100-trt-fp8")
    assert h100.fp8 and not h100.cpu_fallback and h100.arch == "x86_64"
    assert "CPUExecutionProvider" not in h100.provider_names
    assert h100.opset >= 19  # float8 QuantizeLinear

    m2 = load_profile("apple-m2-coreml")
    assert m2.provider_names[0] == "CoreMLExecutionProvider"
    assert m2.execution_providers[0].options["ModelFormat"] == "MLProgram"


def test_gpu_provider_options_are_real_option_names():
    trt_extra = {"device_id"}
    cuda_known = {"device_id", "cudnn_conv_algo_search", "arena_extend_strategy", "do_copy_in_default_stream",
                  "gpu_mem_limit", "cudnn_conv_use_max_workspace", "enable_cuda_graph"}
    for p in list_profiles():
        for ep in p.execution_providers:
            if ep.name == "TensorrtExecutionProvider":
                assert all(k.startswith("trt_") or k in trt_extra for k in ep.options), ep.options
            if ep.name == "CUDAExecutionProvider":
                assert set(ep.options) <= cuda_known, ep.options


# ---------------------------------------------------------------- host detection


def test_host_detection_matches_this_machine():
    h = host.detect()
    assert h.arch == host.normalize_arch(platform.machine())
    assert h.cores >= 1
    p = load_profile("host")
    assert p.detect and p.arch == h.arch and p.cores == h.cores and p.threads == h.cores
    assert p.isa == h.isa
    assert p.quantization == host.quant_defaults(h.arch, h.isa)
    assert p.pruning.channel_multiple == host.channel_multiple(h.arch, h.isa)
    info = host.describe_host()
    assert {"arch", "cpu", "isa", "cores", "os", "python", "onnxruntime"} <= set(info)
    json.dumps(info)


@pytest.mark.parametrize("machine,expected", [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("aarch64", "arm64"),
                                              ("arm64", "arm64"), ("riscv64", "riscv64")])
def test_normalize_arch(machine, expected):
    assert host.normalize_arch(machine) == expected


def test_cpuinfo_x86_vnni():
    info = host.parse_cpuinfo(X86_VNNI)
    assert "8275CL" in info.model
    assert set(info.isa) == {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512", "vnni"}


def test_cpuinfo_x86_avx2_only():
    info = host.parse_cpuinfo(X86_AVX2)
    assert set(info.isa) == {"sse4_2", "avx", "avx2", "fma", "f16c"}
    assert host.quant_defaults("x86_64", info.isa).reduce_range is True
    assert host.channel_multiple("x86_64", info.isa) == 8
    assert not host.int8_dot(info.isa)


def test_cpuinfo_cortex_a76():
    info = host.parse_cpuinfo(ARM_A76)
    assert info.model == "Cortex-A76"
    assert set(info.isa) == {"neon", "dotprod", "fp16"}
    assert host.int8_dot(info.isa)


def test_cpuinfo_graviton3():
    info = host.parse_cpuinfo(ARM_GRAVITON3)
    assert info.model == "Neoverse-V1"
    # 'svei8mm'/'svebf16' must not be mistaken for anything; no sve2 on Neoverse-V1
    assert set(info.isa) == {"neon", "dotprod", "i8mm", "bf16", "fp16", "sve"}


def test_cpuinfo_cortex_a72_has_no_dotprod():
    info = host.parse_cpuinfo(ARM_A72)
    assert info.model == "Cortex-A72"
    assert info.isa == ["neon"]
    assert not host.int8_dot(info.isa)


def test_cpuinfo_features_intersect_across_cpus():
    text = X86_VNNI.replace("avx512_vnni\n\nprocessor", "\n\nprocessor", 1)
    assert "vnni" not in host.parse_cpuinfo(text).isa
    assert host.parse_cpuinfo("") == host.CpuInfo()


def test_cgroup_cpu_max():
    assert host.parse_cgroup_cpu_max("max 100000") is None
    assert host.parse_cgroup_cpu_max("200000 100000") == 2
    assert host.parse_cgroup_cpu_max("150000 100000") == 2
    assert host.parse_cgroup_cpu_max("garbage") is None


@pytest.mark.parametrize("arch,isa,act,wt,reduce,trysign", [
    ("x86_64", ["avx2", "avx512", "vnni"], "uint8", "int8", False, False),
    ("x86_64", ["avx2", "avx_vnni"], "uint8", "int8", False, False),
    ("x86_64", ["avx2", "fma"], "uint8", "int8", True, False),
    ("x86_64", ["avx2", "avx512"], "uint8", "int8", True, False),  # AVX-512F without VNNI still saturates
    ("arm64", ["neon"], "int8", "int8", False, True),
    ("arm64", ["neon", "dotprod", "i8mm"], "int8", "int8", False, True),
])
def test_quant_defaults(arch, isa, act, wt, reduce, trysign):
    q = host.quant_defaults(arch, isa)
    assert (q.format, q.activation_type, q.weight_type) == ("qdq", act, wt)
    assert q.per_channel is True
    assert q.reduce_range is reduce and q.try_signedness is trysign


@pytest.mark.parametrize("arch,isa,mult", [
    ("x86_64", ["avx2", "avx512"], 16), ("x86_64", ["avx2", "amx"], 16), ("x86_64", ["avx2"], 8),
    ("x86_64", ["avx2", "avx_vnni"], 8), ("x86_64", ["sse4_2"], 4), ("arm64", ["neon"], 8),
])
def test_channel_multiple(arch, isa, mult):
    assert host.channel_multiple(arch, isa) == mult


# ---------------------------------------------------------------- loader errors


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "name: foo\n  bad: [\n")
    with pytest.raises(InputError) as ei:
        load_profile(str(path))
    msg = str(ei.value)
    assert str(path) in msg and "line 2" in msg and "\n" not in msg


@pytest.mark.parametrize("text,needle", [("- a\n- b\n", "mapping"), ("", "empty"), ("42\n", "mapping")])
def test_top_level_not_a_mapping(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=needle):
        load_profile(str(path))


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="nope.yaml"):
        load_profile(str(tmp_path / "nope.yaml"))


def test_unknown_field_names_the_field(tmp_path):
    data = _valid_dict()
    data["quantization"]["per_chanel"] = True
    path = _write(tmp_path, yaml.safe_dump(data), "foo.yaml")
    with pytest.raises(DeviceError) as ei:
        load_profile(str(path))
    msg = str(ei.value)
    assert msg.startswith(f"{path}: ")
    assert "unknown field 'quantization.per_chanel'" in msg and "per_channel" in msg


def test_bad_enum_value(tmp_path):
    data = _valid_dict()
    data["quantization"]["weight_type"] = "int4"
    path = _write(tmp_path, yaml.safe_dump(data), "foo.yaml")
    with pytest.raises(DeviceError) as ei:
        load_profile(str(path))
    assert f"{path}: field 'quantization.weight_type': Input should be 'int8' or 'uint8'" in str(ei.value)


def test_unknown_execution_provider_lists_known(tmp_path):
    data = _valid_dict()
    data["execution_providers"] = [{"name": "tensorrtt"}]
    path = _write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(DeviceError) as ei:
        load_profile(str(path))
    msg = str(ei.value)
    assert "'execution_providers.0.name'" in msg and "tensorrtt" in msg
    assert "tensorrt" in msg and "qnn" in msg and "coreml" in msg


def test_missing_required_field(tmp_path):
    data = _valid_dict()
    del data["cores"]
    with pytest.raises(DeviceError, match="missing required field 'cores'"):
        load_profile(str(_write(tmp_path, yaml.safe_dump(data))))


def test_source_is_loader_owned(tmp_path):
    data = _valid_dict()
    data["source"] = "/etc/passwd"
    with pytest.raises(DeviceError, match="source"):
        load_profile(str(_write(tmp_path, yaml.safe_dump(data))))


def test_python_tags_are_rejected(tmp_path):
    path = _write(tmp_path, "name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(InputError, match="invalid YAML"):
        load_profile(str(path))


def test_unknown_device_name_lists_known_names():
    with pytest.raises(DeviceError) as ei:
        load_profile("rpi4")
    msg = str(ei.value)
    assert "'rpi4'" in msg and "did you mean 'rpi4-cortex-a72'" in msg
    for name in REQUIRED:
        assert name in msg


def test_user_yaml_by_path(tmp_path, monkeypatch):
    data = _valid_dict("arm64-cortex-a76")
    data.update(name="my-board", description="Custom Cortex-A76 board", cores=8, threads=6)
    path = _write(tmp_path, yaml.safe_dump(data), "my-board.yml")
    p = load_profile(str(path))
    assert (p.name, p.cores, p.threads, p.source) == ("my-board", 8, 6, path)
    # a bare existing file name (no suffix, no separator) is loaded as a path too
    monkeypatch.chdir(tmp_path)
    (tmp_path / "board").write_text(yaml.safe_dump(data))
    assert load_profile("board").name == "my-board"


def test_file_in_cwd_cannot_shadow_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x86-avx2").write_text("not: [a profile\n")
    assert load_profile("x86-avx2").source == PROFILES_DIR / "x86-avx2.yaml"


def test_user_profile_with_detect_gets_host_values(tmp_path):
    data = _valid_dict("rpi4-cortex-a72")
    data.update(name="here", detect=True, quantization={"op_types": ["Conv", "MatMul"]})
    p = load_profile(str(_write(tmp_path, yaml.safe_dump(data))))
    h = host.detect()
    assert (p.arch, p.cores, p.isa) == (h.arch, h.cores, h.isa)
    assert p.quantization.op_types == ["Conv", "MatMul"]  # a model choice: kept from the YAML


# ---------------------------------------------------------------- property-based: only EdgeErrors escape

_FIELDS = list(DeviceProfile.model_fields) + ["quantization.weight_type", "bogus"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=10)


def _load_or_edge_error(path: Path) -> None:
    try:
        p = load_profile(str(path))
    except EdgeError as e:
        assert "\n" not in str(e)
        return
    assert isinstance(p, DeviceProfile)


_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(text=st.text(max_size=200))
def test_arbitrary_yaml_text_only_raises_edge_errors(tmp_path, text):
    _load_or_edge_error(_write(tmp_path, text))


@_SETTINGS
@given(mapping=st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=8)), _values, max_size=6))
def test_arbitrary_mappings_only_raise_edge_errors(tmp_path, mapping):
    _load_or_edge_error(_write(tmp_path, yaml.safe_dump(mapping)))


@_SETTINGS
@given(key=st.sampled_from(_FIELDS), value=_values, base=st.sampled_from(["x86-avx2", "host", "jetson-orin-trt"]))
def test_mutated_valid_profiles_only_raise_edge_errors(tmp_path, key, value, base):
    data = _valid_dict(base)
    if "." in key:
        outer, inner = key.split(".")
        data[outer] = {**data.get(outer, {}), inner: value}
    else:
        data[key] = value
    _load_or_edge_error(_write(tmp_path, yaml.safe_dump(data)))


# ---------------------------------------------------------------- CLI


def _cli():
    from compress.cli import cli

    return cli


def test_cli_devices_list_json():
    res = CliRunner().invoke(_cli(), ["devices", "list", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {d["name"] for d in data} >= REQUIRED
    for d in data:
        assert d["source"].endswith(f"{d['name']}.yaml")
        DeviceProfile.model_validate({k: v for k, v in d.items() if k != "source"})


def test_cli_devices_list_table_has_no_ansi():
    res = CliRunner().invoke(_cli(), ["devices", "list"])
    assert res.exit_code == 0, res.output
    assert "\x1b[" not in res.output
    for name in REQUIRED:
        assert name in res.output
    assert "tensorrt > cuda > cpu" in res.output


def test_cli_devices_show():
    res = CliRunner().invoke(_cli(), ["devices", "show", "x86-avx2"])
    assert res.exit_code == 0, res.output
    assert "\x1b[" not in res.output
    shown = yaml.safe_load(res.output)  # the text form is YAML (comments aside)
    assert shown["name"] == "x86-avx2" and shown["quantization"]["reduce_range"] is True


def test_cli_devices_show_host_json():
    res = CliRunner().invoke(_cli(), ["devices", "show", "host", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["arch"] == host.normalize_arch(platform.machine())
    assert data["cores"] >= 1 and data["host"]["cores"] == data["cores"]


def test_cli_devices_show_user_file(tmp_path):
    path = _write(tmp_path, yaml.safe_dump(_valid_dict("rpi4-cortex-a72")))
    res = CliRunner().invoke(_cli(), ["devices", "show", str(path), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["source"] == str(path)


@pytest.mark.parametrize("args", [["devices"], ["devices", "list"], ["devices", "show"]])
def test_cli_help_has_examples(args):
    res = CliRunner().invoke(_cli(), [*args, "--help"])
    assert res.exit_code == 0
    assert "Examples:" in res.output and "compress devices" in res.output


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={**__import__("os").environ, "EDGE_COMPRESS_DEBUG": "0"})


def test_subprocess_list_json_and_unknown_device(tmp_path):
    ok = _run("devices", "list", "--json", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert {d["name"] for d in json.loads(ok.stdout)} >= REQUIRED

    bad = _run("devices", "show", "nosuch", cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "nosuch" in lines[0] and "rpi4-cortex-a72" in lines[0] and "host" in lines[0]


def test_session_defaults_stop_spinning_only_when_the_pool_takes_every_core():
    from devices.host import session_defaults

    assert session_defaults(2, 2) == {"session.intra_op.allow_spinning": "0"}
    assert session_defaults(2, 8) == {}
