"""A self-standing HTML page: sections, tables of numbers, images and preformatted text, every string escaped.

Numbers in tables show four significant digits; each cell also keeps the exact value in its
``data-value`` attribute, so a reader (or a test) can get the number the file holds.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from mambaout_pl.training.atomic import atomic_write

__all__ = [
    "Cell",
    "format_number",
    "heading_html",
    "image_html",
    "link_html",
    "page_html",
    "paragraph_html",
    "pre_html",
    "table_html",
    "write_page",
]

Cell = str | int | float | None

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { background: #eef7ee; font-weight: 600; }
caption { text-align: left; color: #555; padding-bottom: 0.3em; }
figure { display: inline-block; margin: 0.4em 0.8em 0.8em 0; vertical-align: top; }
figcaption { color: #555; font-size: 0.9em; }
img.picture { image-rendering: pixelated; border: 1px solid #ccc; }
div.wide { overflow-x: auto; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def format_number(value: float | int) -> str:
    """``value`` with four significant digits (integers as they are)."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _cell(value: Cell, tag: str = "td") -> str:
    if value is None:
        return f"<{tag}></{tag}>"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<{tag} class="number" data-value="{value!r}">{format_number(value)}</{tag}>'
    return f"<{tag}>{html.escape(str(value))}</{tag}>"


def table_html(
    header: Sequence[str] | None,
    rows: Sequence[Sequence[Cell]],
    caption: str | None = None,
    table_id: str | None = None,
    marked_rows: Sequence[int] = (),
) -> str:
    """A table (without a header row when ``header`` is None); rows whose index is in ``marked_rows`` get the
    class ``best``."""
    identifier = f' id="{html.escape(table_id)}"' if table_id else ""
    parts = [f'<div class="wide"><table{identifier}>']
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    if header is not None:
        parts.append("<thead><tr>" + "".join(f"<th>{html.escape(name)}</th>" for name in header) + "</tr></thead>")
    parts.append("<tbody>")
    for index, row in enumerate(rows):
        marked = ' class="best"' if index in marked_rows else ""
        parts.append(f"<tr{marked}>" + "".join(_cell(value) for value in row) + "</tr>")
    parts.append("</tbody></table></div>")
    return "\n".join(parts)


def image_html(source: str, caption: str, width: int | None = None, css_class: str = "") -> str:
    """A figure with the image at ``source`` (a path relative to the page) and its caption."""
    size = f' width="{width}"' if width else ""
    kind = f' class="{html.escape(css_class)}"' if css_class else ""
    alt = html.escape(caption)
    return f'<figure><img src="{html.escape(source)}" alt="{alt}"{size}{kind}><figcaption>{alt}</figcaption></figure>'


def heading_html(text: str) -> str:
    """A sub-heading inside a section."""
    return f"<h3>{html.escape(text)}</h3>"


def paragraph_html(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def link_html(href: str, text: str) -> str:
    """A link to ``href`` (a path relative to the page)."""
    return f'<a href="{html.escape(href)}">{html.escape(text)}</a>'


def pre_html(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def page_html(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """A whole page: ``title``, an optional ``intro`` paragraph, then each ``(heading, body HTML)`` section."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    for heading, body in sections:
        slug = "".join(character if character.isalnum() else "-" for character in heading.lower())
        parts.append(f'<section id="{slug}"><h2>{html.escape(heading)}</h2>\n{body}\n</section>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8); returns ``path``."""
    atomic_write(path, lambda file: file.write(text.encode("utf-8")))
    return path
