"""Write the static results browser: ``<out_dir>/index.html`` + ``thumbs/`` + ``attention/``.

One page, no server: it opens from the file system (file://) with every image a relative link to a thumbnail
written beside it, the style and the script inline (no CDN). For each set: the protocol options, the E/M/H
table, then one row per query (AP E/M/H, worst first); clicking a row shows that query: its image with the
query box, the model's attention maps, its top-k with rank and label colour, and the positives it missed with
their ranks.
"""

from __future__ import annotations

import html
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from dalg.data.images import ImageReadError, load_rgb
from dalg.report.attention import AttentionFn, model_attention, overlays
from dalg.report.content import SETUPS, Hit, QueryEntry, ReportSet, from_set_result
from dalg.report.thumbs import Thumbnails, save_image
from dalg.utils.atomic import write_text_atomic
from dalg.utils.writable import check_writable_dir

log = logging.getLogger(__name__)

LEGEND = {
    "query": "query",
    "easy": "easy positive",
    "hard": "hard positive",
    "junk": "junk (ignored)",
    "negative": "negative",
}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(set_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", set_name)


def _anchor(set_name: str, q: int) -> str:
    return f"{_slug(set_name)}-q{q}"


def _fmt_ap(v: float | None) -> str:
    return "–" if v is None else f"{100.0 * v:.2f}"


def _flat(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            rows += _flat(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


class ReportWriter:
    """Builds the page of several :class:`ReportSet`; images are read and thumbnailed as they are needed."""

    def __init__(
        self,
        out_dir: str | os.PathLike,
        attention: AttentionFn | None = None,
        thumb_size: int = 192,
        query_size: int = 360,
    ):
        self.out_dir = Path(os.path.expanduser(str(out_dir)))
        self.attention = attention
        self.thumbs = Thumbnails(self.out_dir, thumb_size)
        self.query_thumbs = Thumbnails(self.out_dir, query_size, folder="queries")
        self.errors: list[str] = []

    # ------------------------------------------------------------------------------------------ pieces
    def _tile(self, rs: ReportSet, hit: Hit, caption: str) -> str:
        if 0 <= hit.db < len(rs.database_paths):
            path, name = rs.database_paths[hit.db], rs.database_names[hit.db]
            thumb = self.thumbs.get(path)
        else:  # a distractor (indexed after the set's own database): no image known to the report
            path, name, thumb = None, f"distractor {hit.db - len(rs.database_paths)}", None
        if thumb is not None and thumb.src:
            href = _e(os.path.relpath(path, self.out_dir))
            img = f'<a href="{href}"><img loading="lazy" src="{_e(thumb.src)}" alt="{_e(name)}"></a>'
        else:
            why = thumb.error if thumb is not None else "no image"
            if thumb is not None:
                self.errors.append(why)
            img = f'<div class="missing" title="{_e(why)}">no image</div>'
        return (
            f'<div class="tile {_e(hit.label)}" data-db="{hit.db}" data-label="{_e(hit.label)}">{img}'
            f'<div class="cap">{caption}<br>{_e(name)}</div></div>'
        )

    def _query_image(self, q: QueryEntry) -> str:
        thumb = self.query_thumbs.get(q.path) if q.path else None
        if thumb is None or not thumb.src:
            why = thumb.error if thumb is not None else "no image"
            self.errors.append(why)
            return f'<div class="tile query"><div class="missing" title="{_e(why)}">no image</div></div>'
        box = ""
        if q.box is not None and thumb.width and thumb.height:
            x0, y0, x1, y1 = q.box
            style = (
                f"left:{100 * x0 / thumb.width:.3f}%;top:{100 * y0 / thumb.height:.3f}%;"
                f"width:{100 * (x1 - x0) / thumb.width:.3f}%;height:{100 * (y1 - y0) / thumb.height:.3f}%"
            )
            what = "the model saw this crop" if q.cropped else "not cropped: the model saw the whole image"
            tip = f"query box {[round(v) for v in q.box]}: {what}"
            box = f'<div class="qbox" style="{style}" title="{_e(tip)}"></div>'
        href = _e(os.path.relpath(q.path, self.out_dir))
        return (  # the box is placed in percent of a wrapper exactly the image's size
            f'<div class="tile query"><div class="qimg"><a href="{href}"><img loading="lazy" '
            f'src="{_e(thumb.src)}" alt="{_e(q.name)}"></a>{box}</div><div class="cap">query</div></div>'
        )

    def _attention(self, rs: ReportSet, q: QueryEntry) -> str:
        if self.attention is None or not q.path:
            return ""
        try:
            img = load_rgb(q.path)
            if q.cropped:  # the model saw the query cropped to its box
                img = img.crop(tuple(round(v) for v in q.box))
            panels = overlays(self.attention(img))
        except (ImageReadError, OSError, ValueError, RuntimeError) as e:
            self.errors.append(f"attention maps of {q.path}: {e}")
            return f'<p class="err">attention maps unavailable: {_e(e)}</p>'
        figs = []
        for k, (title, image) in enumerate(panels):
            rel = f"attention/{_anchor(rs.name, q.index)}_{k}.jpg"
            save_image(image, self.out_dir / rel)
            figs.append(f'<figure><img loading="lazy" src="{_e(rel)}" alt="{_e(title)}">{_e(title)}</figure>')
        return f'<h4>attention maps</h4><div class="attention">{"".join(figs)}</div>'

    def _detail(self, rs: ReportSet, q: QueryEntry) -> str:
        anchor = _anchor(rs.name, q.index)
        ap = ""
        if q.ap is not None:
            ap = " · ".join(f"AP<sub>{s}</sub> {_fmt_ap(q.ap.get(s))}%" for s in SETUPS)
        tiles = []
        for h in q.results:
            score = "" if h.score is None else f" · {h.score:.4f}"
            tiles.append(self._tile(rs, h, f"#{h.rank} {_e(h.label)}{score}"))
        missed = ""
        if rs.table is not None:
            if q.missed:
                mt = []
                for h in q.missed:
                    where = f"rank {h.rank}" if h.rank is not None else f"beyond rank {rs.kept_ranks}"
                    mt.append(self._tile(rs, h, f"{_e(h.label)} · {where}"))
                missed = f'<h4>missed positives ({len(q.missed)})</h4><div class="tiles missed">'
                missed += "".join(mt) + "</div>"
            else:
                missed = '<h4>missed positives</h4><p class="none">none: every positive is in the top-k</p>'
        return (
            f'<section class="detail" id="detail-{anchor}" data-set="{_e(rs.name)}" data-q="{q.index}">'
            f"<h3>{_e(rs.name)}: query {q.index} · {_e(q.name)}</h3><p>{ap}</p>"
            f'<div class="tiles">{self._query_image(q)}{self._attention(rs, q)}</div>'
            f'<h4>top {len(q.results)}</h4><div class="tiles results">{"".join(tiles)}</div>'
            f"{missed}</section>"
        )

    def _set(self, rs: ReportSet) -> str:
        parts = [f'<h2 id="set-{_slug(rs.name)}">{_e(rs.name)}</h2>']
        parts.append(
            '<table class="protocol"><tbody>'
            + "".join(f"<tr><th class='l'>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in _flat(rs.protocol))
            + "</tbody></table>"
        )
        if rs.table is not None:
            cols = list(next(iter(rs.table.values())))
            head = "".join(f"<th>{_e(c)}</th>" for c in cols)
            body = "".join(
                f"<tr><th class='l'>{s}</th>" + "".join(f"<td>{row[c]:.2f}</td>" for c in cols) + "</tr>"
                for s, row in rs.table.items()
            )
            parts.append(
                f'<table class="scores"><thead><tr><th class="l">setup</th>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table>"
            )
        parts += [f'<p class="note">{_e(n)}</p>' for n in rs.notes]
        if rs.table is not None:
            heads = "".join(f"<th>AP {s} (%)</th>" for s in SETUPS)
            order = rs.worst_first()
            caption = "queries, worst first (by AP Medium): click a row to see its results"
        else:
            heads = "<th>top-1 score</th><th class='l'>top-1</th>"
            order = rs.queries
            caption = "queries: click a row to see its results"
        rows = []
        for q in order:
            if rs.table is not None:
                cells = "".join(f"<td>{_fmt_ap((q.ap or {}).get(s))}</td>" for s in SETUPS)
            else:
                top = q.results[0] if q.results else None
                name = (
                    rs.database_names[top.db] if top is not None and top.db < len(rs.database_names) else ""
                )
                score = "" if top is None or top.score is None else f"{top.score:.4f}"
                cells = f"<td>{score}</td><td class='l'>{_e(name)}</td>"
            rows.append(
                f'<tr data-target="{_anchor(rs.name, q.index)}" data-q="{q.index}">'
                f"<td>{q.index}</td><td class='l'>{_e(q.name)}</td>{cells}</tr>"
            )
        parts.append(
            f'<table class="queries" data-set="{_e(rs.name)}"><caption>{caption}</caption>'
            f"<thead><tr><th>#</th><th class='l'>query</th>{heads}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        parts += [self._detail(rs, q) for q in rs.queries]
        return "\n".join(parts)

    def write(self, sets: Sequence[ReportSet], title: str = "retrieval results", header: str = "") -> Path:
        """Write ``index.html`` (atomically, last) and everything it links to; returns its path."""
        t0 = time.perf_counter()
        sections = [self._set(rs) for rs in sets]
        legend = "".join(f'<span class="{k}">{_e(v)}</span>' for k, v in LEGEND.items())
        body = [f"<h1>{_e(title)}</h1>"]
        if header:
            body.append(f"<p>{_e(header)}</p>")
        if any(rs.table is not None for rs in sets):
            body.append(f'<p class="legend">{legend}</p>')
        if self.errors:
            unique = list(dict.fromkeys(self.errors))
            shown = "".join(f"<li>{_e(e)}</li>" for e in unique)
            summary = f"{len(unique)} problem{'' if len(unique) == 1 else 's'} (images not shown)"
            body.append(f'<details class="errors"><summary>{summary}</summary><ul>{shown}</ul></details>')
        body += sections
        page = resources.files("dalg.report").joinpath("page.html").read_text(encoding="utf-8")
        page = page.replace("__TITLE__", _e(title)).replace("__BODY__", "\n".join(body))
        out = write_text_atomic(page, self.out_dir / "index.html")
        log.info("report %s written in %.1f s", out, time.perf_counter() - t0)
        return out


def write_report(
    out_dir: str | os.PathLike,
    sets: Sequence[ReportSet],
    title: str = "retrieval results",
    header: str = "",
    attention: AttentionFn | None = None,
    thumb_size: int = 192,
) -> Path:
    """The results browser of ``sets`` in ``out_dir`` (see the module doc); returns its index.html."""
    return ReportWriter(out_dir, attention, thumb_size).write(sets, title, header)


def check_report_dir(output_json: str | os.PathLike) -> Path:
    """eval.py's report folder (``report/`` beside the results JSON), checked before any extraction."""
    return check_writable_dir(Path(output_json).parent / "report", "report_html")


def evaluation_browser(
    results: Sequence[Any],
    out_dir: str | os.PathLike,
    net: object | None = None,
    top_k: int = 10,
    attention_size: int | None = 224,
    thumb_size: int = 192,
    title: str = "revisited protocol",
    header: str = "",
) -> Path:
    """The browser of an evaluation: one section per set result (``dalg.retrieval.evaluation.SetResult``),
    with the attention maps of ``net`` over each query (as the model saw it) when ``net`` and
    ``attention_size`` are given."""
    attention = model_attention(net, int(attention_size)) if net is not None and attention_size else None
    sets = [from_set_result(r, top_k) for r in results]
    return ReportWriter(out_dir, attention, thumb_size).write(sets, title, header)
