"""The JSON Schemas shipped for report.json and `compress profile --json`: in step with their typed models, and
real documents (a real `compress run`, a real profile) valid against the shipped files as a CI user would check
them, with jsonschema; a renamed or unknown key is refused."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from compress.report import check_report
from compress.report import schema as report_schema
from runtime import check_profile
from runtime import result as profile_schema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import write_schemas  # noqa: E402


@pytest.mark.parametrize("doc", write_schemas.DOCS, ids=[d.name for d in write_schemas.DOCS])
def test_shipped_schema_matches_its_model(doc) -> None:
    assert doc.path.read_text() == write_schemas.rendered(doc), \
        f"{doc.path.name} is stale: run python tools/write_schemas.py"
    jsonschema.validators.validator_for(json.loads(doc.path.read_text())).check_schema(json.loads(doc.path.read_text()))


def test_every_shipped_schema_is_package_data() -> None:
    """A schema file a wheel leaves out is one a CI user cannot find: each lies where pyproject ships *.schema.json."""
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for doc in write_schemas.DOCS:
        package = ".".join(doc.path.parent.relative_to(ROOT).parts)
        assert "*.schema.json" in data.get(package, []) or doc.path.name in data.get(package, []), doc.path


def _validator(module) -> jsonschema.protocols.Validator:
    schema = json.loads(module.SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def run_report(tmp_path_factory) -> dict:
    """One real run with every stage: fp32, pruned (no recovery) and INT8 of the pruned model (~15 s)."""
    out = tmp_path_factory.mktemp("run") / "out"
    r = subprocess.run([sys.executable, "-m", "compress.cli", "run", "compress.zoo:resnet_tiny", "--input-shape",
                        "1,3,32,32", "--device", "host", "--prune", "0.5", "--no-recover", "--runs", "5", "-o", str(out)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "EDGE_COMPRESS_CACHE": str(out.parent / "cache")})
    assert r.returncode == 0, r.stderr
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def profile_doc(tmp_path_factory) -> dict:
    model = tmp_path_factory.mktemp("p") / "m.onnx"
    r = subprocess.run([sys.executable, "-m", "compress.cli", "export", "compress.zoo:resnet_tiny", "--input-shape",
                        "1,3,32,32", "-o", str(model)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "compress.cli", "profile", str(model), "--device", "host", "--runs", "5",
                        "--json", "-"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_real_run_report_is_valid_against_the_shipped_schema(run_report) -> None:
    assert [v["name"] for v in run_report["variants"]] == ["fp32", "pruned", "int8-unpruned", "int8"]
    assert run_report["stages"]["prune"] and run_report["stages"]["quantize"] and run_report["stages"]["quantize_unpruned"]
    _validator(report_schema).validate(run_report)


def test_real_profile_is_valid_against_the_shipped_schema(profile_doc) -> None:
    assert profile_doc["schema"] == "edge-compress/profile/1" and profile_doc["runs"] == 5
    _validator(profile_schema).validate(profile_doc)


@pytest.mark.parametrize("where, key", [((), "recommended"), (("variants", 1), "within_tolerance"),
                                        (("stages", "quantize"), "fidelity")])
def test_renamed_report_key_is_refused(run_report, where, key) -> None:
    bad = copy.deepcopy(run_report)
    node = bad
    for step in where:
        node = node[step]
    node[key + "_renamed"] = node.pop(key)
    with pytest.raises(ValidationError):
        check_report(bad)
    errors = list(_validator(report_schema).iter_errors(bad))
    assert errors, "the shipped schema must refuse it too"


def test_unknown_top_level_key_is_refused(run_report, profile_doc) -> None:
    with pytest.raises(ValidationError):
        check_report({**run_report, "recomended": "fp32"})
    with pytest.raises(ValidationError):
        check_profile({**profile_doc, "latency": profile_doc["latency_ms"]})
    assert not list(_validator(profile_schema).iter_errors(profile_doc))
    assert list(_validator(profile_schema).iter_errors({**profile_doc, "latency": 1}))


def test_every_device_profile_is_valid_against_the_shipped_schema() -> None:
    """`compress devices list --json` as a CI user parses it: each bundled profile (and host, detected) valid against
    devices/device.schema.json, which refuses an unknown key as the loader does."""
    from compress.cli.devices import profile_json
    from devices import list_profiles

    doc = next(d for d in write_schemas.DOCS if d.name == "device")
    validator = jsonschema.Draft202012Validator(json.loads(doc.path.read_text()))
    profiles = [profile_json(p) for p in list_profiles()]
    assert len(profiles) > 5 and any(p["name"] == "host" for p in profiles)
    for p in profiles:
        validator.validate(p)
    assert list(validator.iter_errors({**profiles[0], "treads": 4}))
