"""Write the JSON Schemas of the documents CI users parse, from their typed models (DOCS: one row per document,
`compress/.../NAME.schema.json`, shipped in the package):

    report    report.json of compress run            compress.report.RunReport
    profile   compress profile --json                runtime.ProfileResult
    compare   compress compare --json                compress.report.Comparison
    prune     compress prune --json                  compress.report.PruneReport
    quantize  compress quantize --json               compress.report.QuantResult
    formats   compress formats --json                compress.report.FormatAdvice
    search    search.json of compress search         compress.tuning.SearchSummary
    sweep     sweep.json of compress sweep           compress.tuning.SweepSummary
    export    compress export --json                 export.ExportResult
    decoder   compress export --with-past --json     export.GenerationExport
    device    a device profile (devices/profiles/*.yaml; compress devices show --json, list --json: a list of them)
                                                     devices.DeviceProfile

Each schema's `$id` names its version (edge-compress/NAME/1); report, profile, compare, search and sweep documents
also carry it in their own "schema" key. Run after changing a model; tests/test_schemas.py fails while a shipped
file differs from its model.

    python tools/write_schemas.py
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress.report import regression, schema  # noqa: E402
from compress.tuning import results as tuning  # noqa: E402
from devices import DeviceProfile  # noqa: E402
from export import ExportResult, GenerationExport  # noqa: E402
from runtime import result as profile  # noqa: E402

VERSION = 1


@dataclass(frozen=True)
class Doc:
    name: str
    model: Any  # a compress.core.Result subclass
    path: Path
    title: str

    @property
    def id(self) -> str:
        return f"edge-compress/{self.name}/{VERSION}"


REPORT_DIR = ROOT / "compress" / "report"
DOCS = [
    Doc("report", schema.RunReport, schema.SCHEMA_FILE, "edge-compress run report (report.json)"),
    Doc("profile", profile.ProfileResult, profile.SCHEMA_FILE, "edge-compress profile (compress profile --json)"),
    Doc("compare", regression.Comparison, regression.SCHEMA_FILE, "edge-compress comparison (compress compare --json)"),
    Doc("prune", schema.PruneReport, REPORT_DIR / "prune.schema.json", "edge-compress prune (compress prune --json)"),
    Doc("quantize", schema.QuantResult, REPORT_DIR / "quantize.schema.json",
        "edge-compress quantize (compress quantize --json)"),
    Doc("formats", schema.FormatAdvice, REPORT_DIR / "formats.schema.json",
        "edge-compress format advice (compress formats --json)"),
    Doc("search", tuning.SearchSummary, tuning.SEARCH_SCHEMA_FILE, "edge-compress search (search.json)"),
    Doc("sweep", tuning.SweepSummary, tuning.SWEEP_SCHEMA_FILE, "edge-compress sweep (sweep.json)"),
    Doc("export", ExportResult, ROOT / "export" / "export.schema.json", "edge-compress export (compress export --json)"),
    Doc("decoder", GenerationExport, ROOT / "export" / "decoder.schema.json",
        "edge-compress decoder export with its KV cache (compress export --with-past --json)"),
    Doc("device", DeviceProfile, ROOT / "devices" / "device.schema.json",
        "edge-compress device profile (devices/profiles/*.yaml, compress devices show --json)"),
]


def rendered(doc: Doc) -> str:
    body = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": doc.id,
            **doc.model.model_json_schema(by_alias=True), "title": doc.title}
    return json.dumps(body, indent=2, sort_keys=False) + "\n"


def main() -> None:
    for doc in DOCS:
        doc.path.write_text(rendered(doc))
        print(f"wrote {doc.path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
