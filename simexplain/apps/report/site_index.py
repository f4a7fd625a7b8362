"""The index of a report site: the table's page files, the search list and ``index.html``.

:class:`SiteIndex` keeps one short row per query (no images) while the queries are
written, and at the end writes them in three orders, ``page_size`` rows a file. The
orders are all derived from one, best top-1 similarity first, which is also the order of
``data/names.js``: the page's script filters that list and finds each hit's row in the
``top-desc`` page files by its position, so the filter and the pages always agree.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from .page import _METHOD_NOTES, _fill, _template_text

__all__ = ["SiteIndex", "write_jsonp", "SORTS"]

# Page file prefixes: top-1 similarity high to low, low to high, failures first.
SORTS = ("top-desc", "top-asc", "failed")
# The global object of site.js that every data file calls.
_CALLBACK = "simexplainSite"


def write_jsonp(path: Path, function: str, *args: Any) -> None:
    """Write ``path`` as a script calling ``simexplainSite.<function>`` with ``args`` as JSON."""
    values = ",".join(json.dumps(a, separators=(",", ":")) for a in args)
    path.write_text(f"{_CALLBACK}.{function}({values});\n", encoding="ascii")


class SiteIndex:
    """The table of queries, a row each, written as page files by :meth:`write`."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._rows: list[dict[str, Any]] = []

    @property
    def count(self) -> int:
        return len(self._rows)

    def add(self, record: dict[str, Any]) -> None:
        """Add the row of a query from its record (as in ``data/queries/<n>.js``)."""
        top = record["matches"][0]
        marks = [m["correct"] for m in record["matches"] if m["correct"] is not None]
        failure = record["failure"]
        self._rows.append({
            "id": len(self._rows),
            "name": record["name"],
            "label": record["label"],
            "image": record["image"],
            "top": top["similarity"],
            "match": top["name"],
            "match_label": top["label"],
            "match_correct": top["correct"],
            "correct": [sum(marks), len(marks)] if marks else None,
            "failed": failure is not None or top["correct"] is False,
            "correct_rank": None if failure is None else failure["correct_rank"],
        })

    def orders(self) -> dict[str, list[int]]:
        """The query numbers in each order of :data:`SORTS`."""
        best = sorted(range(len(self._rows)), key=lambda i: (-self._rows[i]["top"], i))
        failed = [i for i in best if self._rows[i]["failed"]]
        passed = [i for i in best if not self._rows[i]["failed"]]
        return {"top-desc": best, "top-asc": best[::-1], "failed": failed + passed}

    def write(self, folder: Path, header: dict[str, str]) -> None:
        """Write ``data/names.js``, ``data/pages/`` and ``index.html`` into ``folder``."""
        orders = self.orders()
        self._write_names(folder / "data" / "names.js", orders["top-desc"])
        for sort, order in orders.items():
            for page, start in enumerate(range(0, len(order), self.page_size)):
                rows = [self._rows[i] for i in order[start:start + self.page_size]]
                write_jsonp(folder / "data" / "pages" / f"{sort}-{page}.js", "page",
                            f"{sort}-{page}", rows)
        settings = {
            **header,
            "count": self.count,
            "failures": sum(row["failed"] for row in self._rows),
            "page_size": self.page_size,
        }
        (folder / "index.html").write_text(_index_html(settings), encoding="utf-8")

    def _write_names(self, path: Path, order: list[int]) -> None:
        """The search list: ``[name, label number or -1, top-1 similarity, failed]`` a query."""
        labels: dict[str, int] = {}
        names = []
        for i in order:
            row = self._rows[i]
            label = -1 if row["label"] is None else labels.setdefault(row["label"], len(labels))
            names.append([row["name"], label, round(row["top"], 3), int(row["failed"])])
        write_jsonp(path, "names", {"labels": list(labels), "rows": names})


def _index_html(settings: dict[str, Any]) -> str:
    """The classic report's page (``page.html``) around the table and query view."""
    method, layer = html.escape(settings["method"]), html.escape(settings["layer"])
    about = html.escape(_METHOD_NOTES.get(settings["method"], "see the documentation"))
    # "</" inside a script element would end it early; JSON allows the escaped form.
    payload = json.dumps(settings, separators=(",", ":")).replace("</", "<\\/")
    return _fill(
        "page.html",
        title=html.escape(settings["title"]),
        method=f'<p class="method">Maps: <code>{method}</code> ({about}) at layer '
        f"<code>{layer}</code>.</p>",
        note='<p class="counts" id="counts"></p>\n<p class="error" id="error" hidden></p>',
        cards=_fill("site.html"),
        payload=payload,
        css="\n" + _template_text("site.css"),
        script="\n" + _template_text("site.js"),
    ) + "\n"
