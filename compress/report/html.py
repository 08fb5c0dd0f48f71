"""The run report as one self-contained HTML file: the Markdown report's content, with the trade-off plot inline.

The content is `render_markdown`'s, section for section: one renderer decides what the report says and
this module only changes its markup. It reads the small, known subset of Markdown that compress.report.markdown writes
(headings, pipe tables, block quotes, bullets, fenced code, **bold**, *italics*, `code`, an image line and
its <details>/<sub> lines) and escapes every piece of text with html.escape, so nothing from the report
(a variant's name, the command line) can become markup. No Markdown library, no external resources: the
PNG travels as a data: URL.
"""

from __future__ import annotations

import base64
import html
import os
import re
from typing import Any, Optional

from compress.core import atomic_path
from compress.report.markdown import render_markdown
from compress.report.plot import tradeoff_data

_PLOT = "data:plot"  # stands in for the image's path in the Markdown; replaced by the PNG's data: URL
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(" + re.escape(_PLOT) + r"\)$")
_FENCE = re.compile(r"^(`{3,})(\S*)$")
_HEADING = re.compile(r"^(#{1,6}) (.*)$")
_DETAILS = re.compile(r"^<details><summary>(.*)</summary>$")
_SUB = re.compile(r"^<sub>(.*)</sub>$")
_CODE = re.compile(r"``\s(.+?)\s``|`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_EM = re.compile(r"(?<![\w*])\*(?![\s*])(.+?)(?<![\s*])\*(?![\w*])")
_PIPE = re.compile(r"(?<!\\)\|")

CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1f2328;margin:0;background:#fff}
main{max-width:1100px;margin:0 auto;padding:24px 32px}
h1{font-size:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.3em}
h2{font-size:1.3em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.1em}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em}
code{background:#f2f4f6;padding:.1em .3em;border-radius:4px}
pre{background:#f6f8fa;padding:12px 16px;border-radius:6px;overflow-x:auto;white-space:pre-wrap}
pre code{background:none;padding:0}
blockquote{margin:1em 0;padding:.4em 1em;border-left:4px solid #0969da;background:#f6f8fa}
blockquote p{margin:.3em 0}
blockquote p.warn{color:#7d4e00}
table{border-collapse:collapse;margin:1em 0;font-size:.93em}
th,td{border:1px solid #d0d7de;padding:4px 10px}
th{background:#f6f8fa}
tr:nth-child(even) td{background:#fbfcfd}
figure{margin:1em 0}
figure img{max-width:100%;height:auto;border:1px solid #d0d7de;border-radius:6px}
footer{color:#656d76;font-size:.85em;margin-top:2em}
""".strip()


def render_html(report: dict[str, Any], png: Optional[bytes] = None) -> str:
    """The report as a standalone HTML page; `png` (the trade-off plot) is embedded under the variants table."""
    md = render_markdown(report, plot=_PLOT if png else None)
    img = f"data:image/png;base64,{base64.b64encode(png).decode('ascii')}" if png else None
    body = markdown_to_html(md, img, alt=_alt(report) if png else None)
    first = md.split("\n", 1)[0]
    title = first[2:] if first.startswith("# ") else "edge-compress report"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{CSS}\n</style>\n</head>\n<body>\n<main>\n"
            f"{body}\n</main>\n</body>\n</html>\n")


def write_html(report: dict[str, Any], path: str | os.PathLike, png: Optional[bytes] = None) -> None:
    """render_html written atomically to `path`."""
    text = render_html(report, png)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def inline(text: str) -> str:
    """One line of compress.report.markdown's Markdown as HTML: escaped, then `code`, **bold** and *italics* marked up."""
    codes: list[str] = []

    def stash(m: re.Match[str]) -> str:
        codes.append(f"<code>{m.group(1) if m.group(1) is not None else m.group(2)}</code>")
        return f"\x00{len(codes) - 1}\x00"

    s = _CODE.sub(stash, html.escape(text.replace("\x00", ""), quote=True))
    s = _EM.sub(r"<em>\1</em>", _BOLD.sub(r"<strong>\1</strong>", s))
    return re.sub("\x00(\\d+)\x00", lambda m: codes[int(m.group(1))], s)


def _alt(report: dict[str, Any]) -> str:
    what = "--eval accuracy" if tradeoff_data(report)["y"] == "accuracy" else "fidelity to fp32"
    return f"p50 latency vs {what} of each variant, with the Pareto front"


def markdown_to_html(md: str, img: Optional[str] = None, alt: Optional[str] = None) -> str:
    """compress.report.markdown's Markdown as HTML. `img`: the src for the plot's image line (none: the line is dropped);
    `alt`: its alt text (default: the Markdown's)."""
    lines = md.split("\n")
    out: list[str] = []
    para: list[str] = []
    open_details = 0

    def flush() -> None:  # a paragraph's lines: two trailing spaces make a line break, else a space
        if para:
            text = "".join(inline(p.rstrip()) + ("<br>\n" if p.endswith("  ") else " ") for p in para[:-1])
            out.append(f"<p>{text}{inline(para[-1].rstrip())}</p>")
            para.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            end = next((j for j in range(i + 1, len(lines)) if lines[j] == fence.group(1)), len(lines))
            lang = f' class="language-{html.escape(fence.group(2))}"' if fence.group(2) else ""
            out.append(f"<pre><code{lang}>{html.escape(chr(10).join(lines[i + 1:end]))}</code></pre>")
            i = end + 1
            continue
        block = _block(lines, i)
        if block is not None:
            flush()
            html_text, i = block
            out.append(html_text)
            continue
        m = _HEADING.match(line)
        details, sub, image = _DETAILS.match(line), _SUB.match(line), _IMAGE.match(line)
        if m or details or sub or image or not line.strip():
            flush()
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
        elif details:
            open_details += 1
            out.append(f"<details><summary>{inline(details.group(1))}</summary>")
        elif line == "</details>":
            if open_details:
                open_details -= 1
                out.append("</details>")
        elif sub:
            out.append(f"<footer>{inline(sub.group(1))}</footer>")
        elif image:
            if img:
                out.append(f'<figure><img src="{html.escape(img)}" alt="{html.escape(alt or image.group(1))}"></figure>')
        elif line.strip():
            para.append(line)
        i += 1
    flush()
    out += ["</details>"] * open_details
    return "\n".join(out)


def _block(lines: list[str], i: int) -> Optional[tuple[str, int]]:
    """A table, block quote or bullet list starting at lines[i]: (its HTML, the index after it); else None."""
    line = lines[i]
    if line.startswith("|"):
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        return _table(lines[i:j]), j
    if line.startswith(">"):
        j, paras = i, []
        while j < len(lines) and lines[j].startswith(">"):
            text = lines[j][1:].strip()
            cls = ' class="warn"' if text.startswith("⚠") else ""
            paras.append(f"<p{cls}>{inline(text)}</p>")
            j += 1
        return "<blockquote>\n" + "\n".join(paras) + "\n</blockquote>", j
    if line.startswith("- "):
        j, items = i, []
        while j < len(lines) and (lines[j].startswith("- ") or (lines[j].startswith("  ") and lines[j].strip() and items)):
            if lines[j].startswith("- "):
                items.append([lines[j][2:]])
            else:  # an indented line continues the item above
                items[-1].append(lines[j].strip())
            j += 1
        return "<ul>\n" + "\n".join("<li>" + "<br>\n".join(inline(t) for t in it) + "</li>" for it in items) + "\n</ul>", j
    return None


def _cells(row: str) -> list[str]:
    s = row.strip()
    s = s[1:] if s.startswith("|") else s
    s = s[:-1] if s.endswith("|") and not s.endswith("\\|") else s
    return [c.strip().replace("\\|", "|") for c in _PIPE.split(s)]


def _table(rows: list[str]) -> str:
    header = _cells(rows[0])
    body = rows[1:]
    align: list[str] = []
    if body and re.fullmatch(r"\|?(\s*:?-{3,}:?\s*\|)*\s*:?-{3,}:?\s*\|?", body[0].strip()):
        for c in _cells(body[0]):
            align.append("center" if c.startswith(":") and c.endswith(":") else "right" if c.endswith(":") else "left")
        body = body[1:]

    def style(k: int) -> str:
        return f' style="text-align:{align[k]}"' if k < len(align) and align[k] != "left" else ""

    out = ["<table>", "<thead><tr>" + "".join(f"<th{style(k)}>{inline(c)}</th>" for k, c in enumerate(header)) + "</tr></thead>",
           "<tbody>"]
    out += ["<tr>" + "".join(f"<td{style(k)}>{inline(c)}</td>" for k, c in enumerate(_cells(r))) + "</tr>" for r in body]
    return "\n".join(out + ["</tbody>", "</table>"])
