"""The report's document model: blocks built once and rendered to Markdown and to self-contained HTML, so the
two never disagree, and the formatting of the numbers that go into them."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MISSING = "—"
_KNOB_LABELS = {"train.epochs": "epochs", "optim.lr": "LR", "optim.weight_decay": "WD"}


@dataclass(frozen=True)
class Cell:
    text: str
    note: str = ""  # hover text in HTML, a footnote in Markdown


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str | Cell]]


@dataclass(frozen=True)
class Fig:
    name: str
    caption: str
    png: bytes | None  # None: skipped, and the caption says why


Block = Heading | Para | Bullets | Table | Fig


def _alt(name: str) -> str:
    return name.replace("_", " ")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    footnote = 0
    for b in blocks:
        match b:
            case Heading(text, level):
                out.append(f"{'#' * level} {text}\n")
            case Para(text):
                out.append(f"{text}\n")
            case Bullets(items):
                out.append("".join(f"- {item}\n" for item in items))
            case Table(headers, rows):
                lines = ["| " + " | ".join(map(_md_escape, headers)) + " |", "|" + "---|" * len(headers)]
                notes = []
                for row in rows:
                    cells = []
                    for c in row:
                        if isinstance(c, Cell) and c.note:
                            footnote += 1
                            notes.append(f"[^{footnote}]: {_md_escape(c.note)}")
                            cells.append(f"{_md_escape(c.text)}[^{footnote}]")
                        else:
                            cells.append(_md_escape(c.text if isinstance(c, Cell) else c))
                    lines.append("| " + " | ".join(cells) + " |")
                out.append("\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes))
            case Fig(name, caption, png):
                out.append(f"![{_alt(name)}]({name}.png)\n\n*{caption}*\n" if png else f"> *{caption}*\n")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
td[title] { text-decoration: underline dotted; cursor: help; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .note { color: #555; font-style: italic; }
"""


def to_html(title: str, blocks: list[Block]) -> str:
    esc = html.escape
    out = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{esc(title)}</title>\n"
           f"<style>{_CSS}</style>\n</head>\n<body>"]
    for b in blocks:
        match b:
            case Heading(text, level):
                out.append(f"<h{level}>{esc(text)}</h{level}>")
            case Para(text):
                out.append(f"<p>{esc(text)}</p>")
            case Bullets(items):
                out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")
            case Table(headers, rows):
                head = "".join(f"<th>{esc(h)}</th>" for h in headers)
                body = []
                for row in rows:
                    tds = []
                    for c in row:
                        cell = c if isinstance(c, Cell) else Cell(c)
                        attr = f' title="{esc(cell.note)}"' if cell.note else ""
                        tds.append(f"<td{attr}>{esc(cell.text)}</td>")
                    body.append("<tr>" + "".join(tds) + "</tr>")
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
            case Fig(name, caption, png):
                if png:
                    data = base64.b64encode(png).decode("ascii")
                    out.append(f'<figure><img alt="{esc(_alt(name))}" src="data:image/png;base64,{data}">'
                               f"<figcaption>{esc(caption)}</figcaption></figure>")
                else:
                    out.append(f'<p class="note">{esc(caption)}</p>')
    out.append("</body>\n</html>\n")
    return "\n".join(out)



def finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def loss(v: float | None) -> str:
    """A loss in nats; results hold None where a run failed (its reason is beside it)."""
    return f"{v:.4f}" if finite(v) else MISSING


def mult(v: float | None) -> str:
    """A data-efficiency multiplier; None (or inf) is unbounded: the loss lies below the baseline's asymptote."""
    return f"{v:.2f}x" if finite(v) else "∞"


def interval(ci: tuple[float | None, float | None] | list[Any] | None, fmt: Any = loss) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci is not None else ""


def sci(v: float) -> str:
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def sig(v: Any) -> str:
    return f"{v:.4g}" if finite(v) else MISSING


def count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def knob_label(key: str) -> str:
    return _KNOB_LABELS.get(key, key)


def knob(key: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if key.rsplit(".", 1)[-1] in ("lr", "learning_rate") and v:
        return sci(float(v))
    return str(v) if isinstance(v, int) else f"{v:g}"


def knob_order(keys: Iterable[str]) -> list[str]:
    """The paper's column order (epochs, LR, WD) first, then any other knob alphabetically."""
    known = list(_KNOB_LABELS)
    return sorted(set(keys), key=lambda k: (known.index(k) if k in known else len(known), k))


def knobs_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{knob_label(k)}={knob(k, values[k])}" for k in knob_order(values))


def seconds(s: Any) -> str:
    if not finite(s):
        return MISSING
    return f"{s:.0f} s ({s / 3600:.2f} h)" if s >= 3600 else f"{s:.0f} s ({s / 60:.1f} min)"
