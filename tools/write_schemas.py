"""Write the JSON Schemas of the documents CI users parse, from their typed models:

    compress/report/report.schema.json   report.json of compress run (compress.report.schema.RunReport)
    runtime/profile.schema.json          compress profile --json (runtime.result.ProfileResult)
    compress/report/compare.schema.json  compress compare --json (compress.report.regression.Comparison)

Run after changing either model; tests/test_schemas.py fails while a shipped file differs from its model.

    python tools/write_schemas.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress.report import regression as compare_schema  # noqa: E402
from compress.report import schema as report_schema  # noqa: E402
from runtime import result as profile_schema  # noqa: E402

TITLE = {report_schema: "edge-compress run report (report.json)",
         profile_schema: "edge-compress profile (compress profile --json)",
         compare_schema: "edge-compress comparison (compress compare --json)"}


def rendered(module: object) -> str:
    doc = {"$schema": "https://json-schema.org/draft/2020-12/schema", **module.json_schema(),  # type: ignore[attr-defined]
           "title": TITLE[module]}  # type: ignore[index]
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def main() -> None:
    for module in (report_schema, profile_schema, compare_schema):
        path: Path = module.SCHEMA_FILE  # type: ignore[attr-defined]
        path.write_text(rendered(module))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
