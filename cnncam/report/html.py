"""Offline HTML: tiny escaping builders and the page template (inline CSS, no JS, no CDN).

Every piece of text that comes from data (class names, paths, config values) goes through
:func:`esc` (``html.escape``); only :class:`Raw` strings built here are inserted unescaped.
A Content-Security-Policy forbids scripts altogether, a second line of defence should a name
ever slip through unescaped.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1c1c1c;
background:#fafafa}
header{background:#24323f;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px} header p{margin:4px 0 0;color:#c9d4de}
nav{padding:8px 24px;background:#e9eef2;position:sticky;top:0;border-bottom:1px solid #d0d8de}
nav a{margin-right:14px;color:#24323f;text-decoration:none;white-space:nowrap}
main{padding:8px 24px 40px;max-width:1400px}
section{background:#fff;border:1px solid #e1e5e8;border-radius:6px;padding:8px 18px 16px;margin:16px 0}
h2{font-size:18px;border-bottom:1px solid #eee;padding-bottom:4px} h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #dde2e6;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f1f4f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto;border:1px solid #eee;margin:4px 0}
.verdict{font-size:16px;font-weight:600;padding:8px 12px;border-radius:4px;margin:8px 0}
.overfitting,.diverged{background:#fdecea}.underfitting{background:#fff4e0}.healthy{background:#e8f5e9}
.unknown{background:#eef1f4}
.note{color:#7a5b00;background:#fff8e1;padding:4px 8px;border-radius:4px;display:inline-block;margin:4px 0}
.muted{color:#666} code{font-size:12px;background:#f3f3f3;padding:0 3px;word-break:break-all}
.grid{display:flex;flex-wrap:wrap;gap:14px}.grid>div{flex:1 1 420px}
"""
# No scripts at all; images only from the report folder (file: for pages opened from disk).
CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'"


class Raw(str):
    """HTML that was built (and escaped) here; inserted as is."""


def esc(value: object) -> Raw:
    """Escape any value for HTML text or a quoted attribute."""
    return value if isinstance(value, Raw) else Raw(html.escape(str(value), quote=True))


def tag(name: str, body: object = "", **attrs: object) -> Raw:
    """``<name attr="...">body</name>``; attribute values and non-Raw bodies are escaped.

    A trailing underscore is dropped from attribute names (``class_`` -> ``class``).
    """
    attr = "".join(f' {k.rstrip("_")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Raw(f"<{name}{attr}>{esc(body)}</{name}>")


def join(parts: Iterable[object]) -> Raw:
    return Raw("".join(esc(p) for p in parts))


def para(text: object, class_: str | None = None) -> Raw:
    return tag("p", text, class_=class_)


def note(text: object) -> Raw:
    return tag("div", text, class_="note")


def img(src: str, alt: str) -> Raw:
    """A relative image link, so the report folder can be copied anywhere.  Not ``loading=lazy``:
    a print or a headless screenshot would show the images below the fold as empty boxes."""
    return Raw(f'<img src="{esc(src)}" alt="{esc(alt)}">')


def cell(value: object) -> Raw:
    if isinstance(value, bool) or value is None:
        return tag("td", "—" if value is None else ("yes" if value else "no"))
    if isinstance(value, int):
        return tag("td", f"{value:,}", class_="num")
    if isinstance(value, float):
        return tag("td", f"{value:.4g}", class_="num")
    return tag("td", value)


def table(headers: Sequence[object], rows: Iterable[Sequence[object]]) -> Raw:
    head = tag("tr", join(tag("th", h) for h in headers))
    body = join(tag("tr", join(cell(v) for v in row)) for row in rows)
    return tag("table", join([tag("thead", head), tag("tbody", body)]))


def kv_table(pairs: Iterable[tuple[object, object]]) -> Raw:
    """Two-column table of (name, value) rows, names as row headers."""
    return tag("table", join(tag("tr", join([tag("th", k), cell(v)])) for k, v in pairs))


def bullets(items: Iterable[object]) -> Raw:
    return tag("ul", join(tag("li", i) for i in items))


def section(anchor: str, title: str, body: Iterable[object]) -> Raw:
    return Raw(f'<section id="{esc(anchor)}">{tag("h2", title)}{join(body)}</section>')


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, Raw]]) -> str:
    """The whole document; ``sections`` are (anchor, nav label, section HTML)."""
    nav = join(tag("a", label, href=f"#{anchor}") for anchor, label, _ in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # An empty icon: otherwise browsers request favicon.ico and log a 404 error.
        '<link rel="icon" href="data:,">'
        f"{tag('title', title)}<style>{CSS}</style></head>\n<body>"
        f"<header>{tag('h1', title)}{tag('p', subtitle)}</header>"
        f"<nav>{nav}</nav><main>{join(body for _, _, body in sections)}</main>"
        "</body></html>\n"
    )
