"""A tiny document model rendered twice: Markdown (figures linked) and self-contained HTML (figures inlined).

A document is a list of blocks; text is plain (escaped for each format), so both renderings say the same thing.
"""

from __future__ import annotations

import base64
import html
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    numeric: bool = True  # the first column labels, the others are numbers (right-aligned); else all text


@dataclass(frozen=True)
class Figure:
    path: str  # PNG, relative to the document's folder
    caption: str


Block = Heading | Paragraph | Table | Figure
KINDS = {kind.__name__.lower(): kind for kind in (Heading, Paragraph, Table, Figure)}

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; line-height: 1.5;
       max-width: 1080px; margin: 2em auto; padding: 0 1.5em; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f8fa; }
th:first-child, td:first-child, table.text th, table.text td { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 14px; }
"""


def to_json(blocks: list[Block]) -> list[dict]:
    """Blocks as JSON-ready dicts, so that one stage can hand a section of its report to another."""
    return [{"kind": type(b).__name__.lower(), **asdict(b)} for b in blocks]


def from_json(items: list[dict]) -> list[Block]:
    """The inverse of `to_json`; a ValueError names the item that is not a block."""
    blocks = []
    for i, item in enumerate(items):
        fields = dict(item) if isinstance(item, dict) else {}
        kind = KINDS.get(fields.pop("kind", None))
        try:
            blocks.append(kind(**fields))
        except TypeError:
            raise ValueError(f"item {i} is not a document block: {item!r}") from None
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Table):
            value = "---:" if b.numeric else ":---"
            lines = ["| " + " | ".join(map(_md_cell, b.header)) + " |",
                     "|" + "|".join([":---"] + [value] * (len(b.header) - 1)) + "|"]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("\n".join(lines))
        else:
            out.append(f"![{b.caption}]({b.path})\n\n*{b.caption}*")
    return "\n\n".join(out) + "\n"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: list[Block], title: str, root: Path) -> str:
    """One HTML file with inline CSS and every figure (read from `root`) as a data URI."""
    e = html.escape
    body = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>\n" for row in b.rows)
            css = "" if b.numeric else ' class="text"'
            body.append(f"<table{css}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}</tbody>\n</table>")
        else:
            body.append(f'<figure><img src="{_data_uri(root / b.path)}" alt="{e(b.caption)}">'
                        f"<figcaption>{e(b.caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
