"""Turn a page (see :mod:`bergson.reports.data`) into one self-contained HTML file."""

from __future__ import annotations

import html
import json
from importlib.resources import files
from typing import Any

TEMPLATE = "page.html"
DATA_MARK = "__BERGSON_DATA__"
TITLE_MARK = "__BERGSON_TITLE__"


def embed_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no '<', '>' or '&' appear literally, so
    document text can never close the element or open another."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def template() -> str:
    return files("bergson.reports").joinpath(TEMPLATE).read_text(encoding="utf-8")


def render(page: dict[str, Any]) -> str:
    """The HTML of a page: the template with its title and data filled in (CSS and JS inline)."""
    out = template()
    assert DATA_MARK in out and TITLE_MARK in out
    out = out.replace(TITLE_MARK, html.escape(str(page.get("title", "bergson report"))), 1)
    head, _, tail = out.rpartition(DATA_MARK)  # the data mark follows the title in the template
    return head + embed_json(page) + tail
