"""What a run hands on and what people read after it: the typed results (schema.py: prune, quantize, variant,
run; report.json is their JSON form), report.json validated and rendered as Markdown and HTML, the trade-off
plot, and the small formatters the search and sweep reports share.

What other rooms may use is named here, and imported on first use (see compress/core/lazy.py)."""

from compress.core import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "budgets": ["Budgets", "Miss", "accuracy_drop", "enforce", "profile_misses", "run_misses"],
    "documents": ["MAX_JSON_BYTES", "read_json_file"],
    "regression": ["COMPARE_SCHEMA", "Change", "Comparison", "FigureJson", "changes", "parse_limit"],
    "html": ["render_html", "write_html"],
    "markdown": ["SCHEMA", "render_markdown", "validate_report", "write_markdown"],
    "plot": ["Point", "pareto_front", "plot_tradeoff", "render_png", "write_png"],
    "schema": [
        "REPORT_SCHEMA", "Built", "ExportedFile", "Fidelity", "FormatAdvice", "PruneMeasured", "PruneReport", "PruneResult", "QuantResult", "RunReport", "Stages", "ThreadTuning",
        "Variant", "VariantProfile", "VariantTiming", "check_report",
    ],
    "text": ["box_f1", "code", "fidelity_metric", "fmt_fidelity", "fmt_ms", "fmt_speedup", "fmt_stage_seconds", "per_token_rows", "table"],
})
