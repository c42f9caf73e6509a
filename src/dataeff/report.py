"""The experiment report: PNG figures, ``report.md`` and one self-contained ``report.html`` from ``results.json``.

It mirrors "Pre-training under infinite compute": loss vs epochs per weight decay (why regularisation wins),
loss vs parameters with fitted asymptotes and bootstrap bands, the data-scaling baseline that turns losses
into data-efficiency multipliers, and the tuned hyperparameters with their local-optimality certificates.
The report is built once as a list of blocks and rendered twice, so Markdown and HTML never disagree.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from dataeff.errors import DataeffError
from dataeff.fsutil import atomic_path, read_jsonl

_DPI = 120
_FIGURES = ("overfitting", "loss_vs_params", "data_efficiency", "training_curves")
_KNOB_LABELS = {"train.epochs": "epochs", "optim.lr": "LR", "optim.weight_decay": "WD"}
_TUNED_KEYS = {"recipe": str, "size": str, "params": int, "budget": int, "best": dict, "best_loss": float,
               "certified": bool, "evaluations": list}
_MISSING = "—"


# ---------------------------------------------------------------------------------------------------------
# Loading


def _load(path: Path) -> dict[str, Any]:
    """results.json, checked just enough that every later lookup of a required field succeeds."""
    try:
        # json.dumps wrote failed losses as Infinity/NaN, which json.loads reads back as floats.
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataeffError(f"{path}: not found; run the pipeline first") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataeffError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise DataeffError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None

    def need(obj: Any, key: str, kind: type, where: str) -> None:
        value = obj.get(key)
        # JSON keeps no int/float distinction a writer can rely on (a loss of exactly 3 is written 3).
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int)) or (kind is int and isinstance(value, float))
        if not ok or (kind is not bool and isinstance(value, bool)):
            raise DataeffError(f"{path}: field {where}{key} is missing or not a {kind.__name__}")

    if not isinstance(doc, dict):
        raise DataeffError(f"{path}: expected a JSON object at the top level")
    for key, kind in (("name", str), ("world_tokens", int), ("tuned", list), ("fits", dict), ("verdict", list)):
        need(doc, key, kind, "")
    for i, entry in enumerate(doc["tuned"]):
        if not isinstance(entry, dict):
            raise DataeffError(f"{path}: field tuned[{i}] is not an object")
        for key, kind in _TUNED_KEYS.items():
            need(entry, key, kind, f"tuned[{i}].")
    for section in ("data_scaling", "multipliers"):
        if not isinstance(doc.get(section, {}), dict):
            raise DataeffError(f"{path}: field {section} is not an object")
    for i, entry in enumerate(doc["tuned"]):
        for j, ev in enumerate(entry["evaluations"]):
            if not isinstance(ev, dict):
                raise DataeffError(f"{path}: field tuned[{i}].evaluations[{j}] is not an object")
            need(ev, "values", dict, f"tuned[{i}].evaluations[{j}].")
            need(ev, "loss", float, f"tuned[{i}].evaluations[{j}].")
    for label, m in doc.get("multipliers", {}).items():
        if not isinstance(m, dict):
            raise DataeffError(f"{path}: field multipliers.{label} is not an object")
    if not isinstance(doc.get("overfitting", []), list):
        raise DataeffError(f"{path}: field overfitting is not a list")
    for i, row in enumerate(doc.get("overfitting", [])):
        if not isinstance(row, dict):
            raise DataeffError(f"{path}: field overfitting[{i}] is not an object")
        for key in ("optim.weight_decay", "train.epochs", "loss"):
            need(row, key, float, f"overfitting[{i}].")
    return doc


def _locate(root: Path, run_dir: str | None) -> Path | None:
    """A run directory as recorded (relative to the pipeline's working directory) or moved along with root."""
    if not run_dir:
        return None
    p = Path(run_dir)
    return next((c for c in (p, root / p, root / "runs" / p.name) if c.is_dir()), None)


def _failure_reason(root: Path, run_dir: str | None) -> str | None:
    d = _locate(root, run_dir)
    if d is None or not (d / "FAILED").is_file():
        return None
    try:
        return str(json.loads((d / "FAILED").read_text(encoding="utf-8")).get("reason") or "") or None
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------------
# Formatting


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _loss(v: Any) -> str:
    if _finite(v):
        return f"{v:.4f}"
    return "inf (failed)" if v == math.inf else _MISSING


def _mult(v: Any) -> str:
    if _finite(v):
        return f"{v:.2f}x"
    return "∞" if v == math.inf else _MISSING


def _pair(v: Any) -> tuple[float, float] | None:
    """An interval [lo, hi] as results.json stores it, or None if absent or malformed."""
    if isinstance(v, list | tuple) and len(v) == 2 and all(isinstance(x, int | float) for x in v):
        return float(v[0]), float(v[1])
    return None


def _interval(ci: Any, fmt: Any = _loss) -> str:
    pair = _pair(ci)
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]" if pair else ""


def _sci(v: float) -> str:
    mantissa, exponent = f"{v:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _sig(v: Any) -> str:
    return f"{v:.4g}" if _finite(v) else _MISSING


def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _knob_label(key: str) -> str:
    return _KNOB_LABELS.get(key, key)


def _knob(key: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if key.rsplit(".", 1)[-1] in ("lr", "learning_rate") and v:
        return _sci(float(v))
    return str(v) if isinstance(v, int) else f"{v:g}"


def _knob_order(keys: Iterable[str]) -> list[str]:
    """The paper's column order (epochs, LR, WD) first, then any other knob alphabetically."""
    known = list(_KNOB_LABELS)
    return sorted(set(keys), key=lambda k: (known.index(k) if k in known else len(known), k))


def _knobs_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{_knob_label(k)}={_knob(k, values[k])}" for k in _knob_order(values))


def _seconds(s: Any) -> str:
    if not _finite(s):
        return _MISSING
    return f"{s:.0f} s ({s / 3600:.2f} h)" if s >= 3600 else f"{s:.0f} s ({s / 60:.1f} min)"


# ---------------------------------------------------------------------------------------------------------
# Document model: built once, rendered as Markdown and as HTML.


@dataclass(frozen=True)
class _Cell:
    text: str
    note: str = ""  # hover text in HTML, a footnote in Markdown


@dataclass(frozen=True)
class _Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class _Para:
    text: str


@dataclass(frozen=True)
class _Bullets:
    items: list[str]


@dataclass(frozen=True)
class _Table:
    headers: list[str]
    rows: list[list[str | _Cell]]


@dataclass(frozen=True)
class _Fig:
    name: str
    caption: str
    png: bytes | None  # None: skipped, and the caption says why


_Block = _Heading | _Para | _Bullets | _Table | _Fig


def _alt(name: str) -> str:
    return name.replace("_", " ")


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _to_markdown(blocks: list[_Block]) -> str:
    out: list[str] = []
    footnote = 0
    for b in blocks:
        match b:
            case _Heading(text, level):
                out.append(f"{'#' * level} {text}\n")
            case _Para(text):
                out.append(f"{text}\n")
            case _Bullets(items):
                out.append("".join(f"- {item}\n" for item in items))
            case _Table(headers, rows):
                lines = ["| " + " | ".join(map(_md_escape, headers)) + " |", "|" + "---|" * len(headers)]
                notes = []
                for row in rows:
                    cells = []
                    for c in row:
                        if isinstance(c, _Cell) and c.note:
                            footnote += 1
                            notes.append(f"[^{footnote}]: {_md_escape(c.note)}")
                            cells.append(f"{_md_escape(c.text)}[^{footnote}]")
                        else:
                            cells.append(_md_escape(c.text if isinstance(c, _Cell) else c))
                    lines.append("| " + " | ".join(cells) + " |")
                out.append("\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes))
            case _Fig(name, caption, png):
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


def _to_html(title: str, blocks: list[_Block]) -> str:
    esc = html.escape
    out = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{esc(title)}</title>\n"
           f"<style>{_CSS}</style>\n</head>\n<body>"]
    for b in blocks:
        match b:
            case _Heading(text, level):
                out.append(f"<h{level}>{esc(text)}</h{level}>")
            case _Para(text):
                out.append(f"<p>{esc(text)}</p>")
            case _Bullets(items):
                out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")
            case _Table(headers, rows):
                head = "".join(f"<th>{esc(h)}</th>" for h in headers)
                body = []
                for row in rows:
                    tds = []
                    for c in row:
                        cell = c if isinstance(c, _Cell) else _Cell(c)
                        attr = f' title="{esc(cell.note)}"' if cell.note else ""
                        tds.append(f"<td{attr}>{esc(cell.text)}</td>")
                    body.append("<tr>" + "".join(tds) + "</tr>")
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
            case _Fig(name, caption, png):
                if png:
                    data = base64.b64encode(png).decode("ascii")
                    out.append(f'<figure><img alt="{esc(_alt(name))}" src="data:image/png;base64,{data}">'
                               f"<figcaption>{esc(caption)}</figcaption></figure>")
                else:
                    out.append(f'<p class="note">{esc(caption)}</p>')
    out.append("</body>\n</html>\n")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------
# Figures


def _new_figure(width: float = 7.5, height: float = 4.8) -> tuple[Figure, Axes]:
    # Figure without pyplot: no global state and no GUI backend, so the pipeline can call this anywhere.
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _curve(fit: dict[str, Any], x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", divide="ignore"):
        return fit["E"] + np.exp(math.log(fit["A"]) - fit["alpha"] * np.log(x))


def _band(fit: dict[str, Any], x: np.ndarray, ci: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Pointwise percentile interval of the bootstrap replicates' curves."""
    reps = fit.get("replicates")
    if not isinstance(reps, dict):
        return None
    e, a, alpha = (np.asarray(reps.get(k, []), dtype=float) for k in ("E", "A", "alpha"))
    n = min(len(e), len(a), len(alpha))
    ok = np.isfinite(e[:n]) & np.isfinite(alpha[:n]) & (a[:n] > 0)
    if not ok.any():
        return None
    with np.errstate(over="ignore", divide="ignore"):
        curves = e[:n][ok, None] + np.exp(np.log(a[:n][ok, None]) - alpha[:n][ok, None] * np.log(x)[None, :])
    lo, hi = np.nanpercentile(curves, [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    return lo, hi


def _has_fit(fit: Any) -> bool:
    return isinstance(fit, dict) and all(_finite(fit.get(k)) for k in ("E", "A", "alpha")) and fit["A"] > 0


def _set_ylim(ax: Axes, values: Iterable[float]) -> tuple[float, float]:
    """Limits from the data, not from bands that blow up at the small-x end."""
    v = [x for x in values if _finite(x)]
    lo, hi = (min(v), max(v)) if v else (0.0, 1.0)
    pad = max(hi - lo, 1e-3) * 0.12
    ax.set_ylim(lo - pad, hi + pad)
    return lo - pad, hi + pad


def _overfitting_points(results: dict[str, Any]) -> tuple[dict[float, list[tuple[float, float, str | None]]], str, str] | None:
    """({weight decay: [(epochs, loss, error)]}, where, source) from the overfitting runs or, failing that,
    the tuning runs of the recipe that tunes weight decay (at its optimum's other knobs)."""
    rows = results.get("overfitting") or []
    if rows:
        curves: dict[float, list[tuple[float, float, str | None]]] = {}
        for r in rows:
            curves.setdefault(float(r["optim.weight_decay"]), []).append((float(r["train.epochs"]), float(r["loss"]), r.get("error")))
        lr = rows[0].get("optim.lr")
        return curves, f"size {rows[0].get('size', '?')}" + (f", LR {_sci(lr)}" if _finite(lr) else ""), ""
    recipe = next((r.get("name") for r in results.get("recipes") or []
                   if "optim.weight_decay" in (r.get("grid") or {}) and "train.epochs" in (r.get("grid") or {})), None)
    entries = sorted((t for t in results["tuned"] if t["recipe"] == recipe and t["budget"] == results["world_tokens"]),
                     key=lambda t: t["params"])
    for t in entries:
        others = {k: v for k, v in t["best"].items() if k not in ("optim.weight_decay", "train.epochs")}
        curves = {}
        for ev in t["evaluations"]:
            values = ev.get("values") or {}
            if "optim.weight_decay" in values and "train.epochs" in values and all(values.get(k) == v for k, v in others.items()):
                curves.setdefault(float(values["optim.weight_decay"]), []).append(
                    (float(values["train.epochs"]), float(ev["loss"]), ev.get("error")))
        # A curve needs two epochs to show a trend; three points in all is the least that says anything.
        curves = {wd: pts for wd, pts in curves.items() if len({e for e, _, _ in pts}) >= 2}
        if sum(len(p) for p in curves.values()) >= 3:
            lr = others.get("optim.lr")
            where = f"size {t['size']}" + (f", LR {_sci(lr)}" if _finite(lr) else "")
            return curves, where, f" No overfitting sweep was run: the points are {recipe}'s tuning runs at its optimum's other knobs."
    return None


def _fig_overfitting(results: dict[str, Any]) -> tuple[bytes | None, str]:
    found = _overfitting_points(results)
    if found is None:
        return None, ("Overfitting figure skipped: no overfitting sweep was run (set overfitting.size) and no "
                      "recipe's tuning runs trace loss against epochs at two or more points per weight decay.")
    curves, where, source = found
    fig, ax = _new_figure()
    finite = [loss for pts in curves.values() for _, loss, _ in pts if math.isfinite(loss)]
    _, top = _set_ylim(ax, finite)
    colors = _colors(len(curves))
    n_failed = 0
    epochs_all: set[float] = set()
    for color, (wd, pts) in zip(colors, sorted(curves.items()), strict=True):
        pts = sorted(pts)
        epochs_all.update(e for e, _, _ in pts)
        ok = [(e, loss) for e, loss, _ in pts if math.isfinite(loss)]
        if ok:
            ax.plot(*zip(*ok, strict=True), "o-", color=color, label=f"WD {wd:g}")
        bad = [e for e, loss, _ in pts if not math.isfinite(loss)]
        n_failed += len(bad)
        if bad:
            ax.plot(bad, [top] * len(bad), "x", color=color, markersize=9, mew=2, clip_on=False)
    if n_failed:
        ax.plot([], [], "x", color="0.3", mew=2, label="failed run (plotted at the top)")
    ax.set_xscale("log", base=2)
    ticks = sorted(epochs_all)
    ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("epochs (log2)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"Held-out loss vs epochs per weight decay ({where})", fontsize=10)
    ax.legend(fontsize=8)
    caption = f"Held-out loss against epochs, one line per weight decay ({where}).{source}"
    if n_failed:
        caption += f" {n_failed} failed run(s) are drawn as x at the top edge."
    return _png(fig), caption


def _colors(n: int) -> list[Any]:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _fig_loss_vs_params(results: dict[str, Any], ci: float) -> tuple[bytes | None, str]:
    world = results["world_tokens"]
    fits = results["fits"]
    names = list(dict.fromkeys([*fits, *(t["recipe"] for t in results["tuned"])]))
    at_world = {name: sorted((t for t in results["tuned"] if t["recipe"] == name and t["budget"] == world), key=lambda t: t["params"])
                for name in names}
    all_n = [t["params"] for entries in at_world.values() for t in entries]
    if not all_n:
        return None, "Loss-vs-parameters figure skipped: no tuned results at the world's token budget."
    fig, ax = _new_figure(8.0, 5.0)
    x = np.geomspace(min(all_n) / 1.5, max(all_n) * 100, 300)
    y_seen: list[float] = []
    notes = []
    for color, name in zip(_colors(len(names)), names, strict=True):
        entries = at_world[name]
        ok = [t for t in entries if _finite(t["best_loss"])]
        for certified in (True, False):
            pts = [t for t in ok if bool(t["certified"]) is certified]
            if pts:
                ax.plot([t["params"] for t in pts], [t["best_loss"] for t in pts], "o", ms=8, color=color,
                        mfc=color if certified else "none", mew=1.8, zorder=3)
        y_seen += [t["best_loss"] for t in ok]
        if len(ok) < len(entries):
            notes.append(f"{name}: {len(entries) - len(ok)} size(s) where every run failed are not drawn")
        fit = fits.get(name, {})
        if not _has_fit(fit):
            ax.plot([], [], "o", color=color, label=f"{name} (no fit)")
            reason = fit.get("refused", "no fit") if isinstance(fit, dict) else "no fit"
            notes.append(f"{name}: points only, fit refused ({reason})")
            continue
        e_ci = _pair(fit.get("E_ci"))
        ax.plot(x, _curve(fit, x), "-", color=color,
                label=f"{name}: E={fit['E']:.4f} {_interval(fit.get('E_ci'))}, α={fit['alpha']:.3g}")
        ax.axhline(fit["E"], color=color, ls="--", lw=1)
        if e_ci and all(map(math.isfinite, e_ci)):
            # Drawn but not used for the limits: a degenerate interval (E -> 0) would flatten the data.
            ax.axhspan(*e_ci, color=color, alpha=0.08, lw=0)
        band = _band(fit, x, ci)
        if band is not None:
            ax.fill_between(x, *band, color=color, alpha=0.2, lw=0)
        y_seen.append(fit["E"])
    best = results.get("standard_best")
    if _finite(best):
        ax.axhline(best, color="0.4", ls=":", lw=1.2, label=f"{results.get('baseline_recipe', 'standard')} best {best:.4f}")
        y_seen.append(best)
    _set_ylim(ax, y_seen)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N (log)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"Tuned loss vs parameters at {_count(world)} tokens", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], marker="o", ls="", color="0.3", mfc="none", mew=1.8))
    labels.append("uncertified optimum (hollow)")
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    caption = (f"Best tuned loss per size with the fitted E + A·N^-α extended to 100× the largest N, the asymptote E "
               f"(dashed, shaded: its {ci:.0%} interval) and the {ci:.0%} bootstrap band of the curve. "
               "Hollow markers: the optimum is not certified.")
    if notes:
        caption += " " + "; ".join(notes) + "."
    return _png(fig), caption


def _fig_data_efficiency(results: dict[str, Any], ci: float) -> tuple[bytes | None, str]:
    ds = results.get("data_scaling") or {}
    pts = [(float(b), float(loss)) for b, loss in zip(ds.get("budgets") or [], ds.get("best_loss") or [], strict=False)
           if _finite(loss)]
    if not pts:
        return None, "Data-efficiency figure skipped: no data-scaling baseline was run (set data_scaling.budgets)."
    world = float(results["world_tokens"])
    baseline = results.get("baseline_recipe", "standard")
    multipliers = results.get("multipliers") or {}
    reach = [m["power_law"] for m in multipliers.values() if _finite(m.get("power_law"))]
    d_max = min(max([p[0] for p in pts] + [world * r for r in reach]) * 2, max(p[0] for p in pts) * 1e3)
    x = np.geomspace(min(p[0] for p in pts) / 1.5, d_max, 300)
    fig, ax = _new_figure(8.0, 5.0)
    ax.plot(*zip(*pts, strict=True), "o", color="k", ms=7, zorder=3, label=f"{baseline}: best loss per budget")
    y_seen = [p[1] for p in pts]
    fitted = _has_fit(ds)
    if fitted:
        ax.plot(x, _curve(ds, x), "-", color="k", lw=1.2,
                label=f"fit: E={ds['E']:.4f} {_interval(ds.get('E_ci'))}, α={ds['alpha']:.3g}")
        band = _band(ds, x, ci)
        if band is not None:
            ax.fill_between(x, *band, color="k", alpha=0.12, lw=0)
    ax.axvline(world, color="0.5", lw=1, ls="-.", label=f"world budget {_count(world)} tokens")
    colors = _colors(len(multipliers))
    for color, (label, m) in zip(colors, multipliers.items(), strict=True):
        loss = m.get("loss")
        if not _finite(loss):
            continue
        pl, interp = m.get("power_law"), m.get("interpolated")
        text = f"{label} {loss:.4f}: {_mult(pl)} {_interval(m.get('power_law_ci'), _mult)} (power law)" if "power_law" in m \
            else f"{label} {loss:.4f}"
        if _finite(interp):
            text += f", {_mult(interp)} interpolated"
        ax.axhline(loss, color=color, ls="--" if label.endswith("asymptote") else ":", lw=1.4, label=text)
        y_seen.append(loss)
        if _finite(pl):
            ax.plot([pl * world], [loss], "D", color=color, ms=6, zorder=4)
            ax.annotate(_mult(pl), (pl * world, loss), textcoords="offset points", xytext=(5, 4), fontsize=8, color=color)
    _set_ylim(ax, y_seen)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D (log)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Data efficiency: tokens the baseline needs to reach each loss", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    caption = (f"The {baseline} recipe's best loss per token budget"
               + (f" with its fitted E + A·D^-α and {ci:.0%} bootstrap band" if fitted else
                  f" (fit refused: {ds.get('refused', 'no fit')})")
               + ". Horizontal lines: each recipe's asymptote (dashed) and best measured loss (dotted); diamonds "
               "mark where the baseline's law reaches them, at multiplier × the world budget (vertical line).")
    return _png(fig), caption


def _fig_training_curves(results: dict[str, Any], root: Path) -> tuple[bytes | None, str]:
    world = results["world_tokens"]
    curves = []
    for name in dict.fromkeys(t["recipe"] for t in results["tuned"]):
        entries = [t for t in results["tuned"] if t["recipe"] == name and t["budget"] == world]
        if not entries:
            continue
        top = max(entries, key=lambda t: t["params"])
        d = _locate(root, top.get("best_run_dir"))
        rows = read_jsonl(d / "metrics.jsonl") if d else []
        train = [(r["step"], r["train_loss"]) for r in rows if _finite(r.get("train_loss")) and "step" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if _finite(r.get("val_loss")) and "step" in r]
        if train or val:
            curves.append((f"{name} ({top['size']}, {_knobs_text(top['best'])})", train, val))
    if not curves:
        return None, "Training-curves figure skipped: no metrics.jsonl found for the best runs at the largest size."
    fig, ax = _new_figure()
    for color, (label, train, val) in zip(_colors(len(curves)), curves, strict=True):
        if train:
            ax.plot(*zip(*train, strict=True), "-", color=color, alpha=0.6, lw=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=color, ms=4, label=f"{label} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training curves of each recipe's best run at the largest size", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig), "Training (thin) and held-out (markers) loss of each recipe's best run at the largest size."


# ---------------------------------------------------------------------------------------------------------
# Tables


def _tuned_tables(results: dict[str, Any]) -> list[_Block]:
    blocks: list[_Block] = []
    world = results["world_tokens"]
    for name in dict.fromkeys(t["recipe"] for t in results["tuned"]):
        entries = sorted((t for t in results["tuned"] if t["recipe"] == name),
                         key=lambda t: (t["budget"] != world, t["budget"], t["params"]))
        knobs = _knob_order(k for t in entries for k in t["best"])
        several_budgets = len({t["budget"] for t in entries}) > 1
        headers = ["size", "params", *(["tokens"] if several_budgets else []), *map(_knob_label, knobs), "loss", "certified"]
        rows: list[list[str | _Cell]] = []
        for t in entries:
            cert = _Cell("✓") if t["certified"] else _Cell("✗", t.get("reason") or "not certified")
            rows.append([t["size"], _count(t["params"]), *([_count(t["budget"])] if several_budgets else []),
                         *(_knob(k, t["best"][k]) if k in t["best"] else _MISSING for k in knobs), _loss(t["best_loss"]), cert])
        blocks += [_Heading(f"Tuned hyperparameters: {name}", 3), _Table(headers, rows)]
    return blocks


def _fit_row(label: str, axis: str, fit: dict[str, Any]) -> list[str | _Cell]:
    n = len(set(fit.get("x") or []))
    if not _has_fit(fit):
        return [label, axis, str(n), _Cell("refused", str(fit.get("refused", "no fit"))), _MISSING, _MISSING, _MISSING, _MISSING]
    loo = fit.get("leave_largest_out")
    if isinstance(loo, dict) and _finite(loo.get("error")):
        held = f"{_loss(loo.get('predicted'))} predicted vs {_loss(loo.get('actual'))} measured (error {loo['error']:+.4f})"
    else:
        held = f"{_MISSING} (needs ≥ 4 points)"
    boot = f"{fit.get('n_boot', '?')} {fit.get('method', '')} refits".replace("  ", " ")
    return [label, axis, str(n), f"{_loss(fit['E'])} {_interval(fit.get('E_ci'))}",
            f"{_sig(fit['A'])} {_interval(fit.get('A_ci'), _sig)}", f"{_sig(fit['alpha'])} {_interval(fit.get('alpha_ci'), _sig)}",
            boot, held]


def _fits_table(results: dict[str, Any], ci: float) -> _Table:
    rows = [_fit_row(name, "N", fit) for name, fit in results["fits"].items() if isinstance(fit, dict)]
    ds = results.get("data_scaling") or {}
    if ds:
        rows.append(_fit_row(f"{results.get('baseline_recipe', 'standard')} (data scaling)", "D", ds))
    headers = ["recipe", "x", "points", f"E [{ci:.0%} CI]", "A", "α", "bootstrap", "leave-largest-out"]
    return _Table(headers, rows)


def _multipliers_table(results: dict[str, Any], ci: float) -> _Table:
    rows: list[list[str | _Cell]] = []
    for label, m in (results.get("multipliers") or {}).items():
        pl = f"{_mult(m.get('power_law'))} {_interval(m.get('power_law_ci'), _mult)}" if "power_law" in m else _MISSING
        note = m.get("interpolated_note") or ""
        interp = _Cell(_mult(m.get("interpolated")), note) if note else _Cell(_mult(m.get("interpolated")))
        rows.append([label, _loss(m.get("loss")), pl, interp])
    return _Table(["target", "loss", f"power law [{ci:.0%} CI]", "interpolated"], rows)


def _failed_runs(results: dict[str, Any], root: Path) -> list[list[str | _Cell]]:
    rows: list[list[str | _Cell]] = []
    seen: set[str] = set()

    def add(context: str, values: dict[str, Any], loss: Any, run_dir: str | None, error: str | None) -> None:
        if not error and _finite(loss):
            return
        key = run_dir or f"{context} {values}"
        if key in seen:
            return
        seen.add(key)
        reason = error or _failure_reason(root, run_dir) or f"loss is {loss}"
        shown = run_dir or _MISSING
        if run_dir and Path(run_dir).is_relative_to(root):
            shown = str(Path(run_dir).relative_to(root))
        rows.append([context, _knobs_text(values), shown, reason])

    for t in results["tuned"]:
        for ev in t["evaluations"]:
            add(f"{t['recipe']} / {t['size']} / {_count(t['budget'])} tokens", ev.get("values") or {}, ev.get("loss"),
                ev.get("run_dir"), ev.get("error"))
    for r in results.get("overfitting") or []:
        add(f"overfitting / {r.get('size', '?')}", {k: v for k, v in r.items() if "." in k}, r.get("loss"), r.get("run_dir"), r.get("error"))
    return rows


def _totals(results: dict[str, Any], n_failed: int) -> _Bullets:
    n_eval = sum(len(t["evaluations"]) for t in results["tuned"])
    seeds = len((results.get("config") or {}).get("seeds") or [0])
    params = results.get("params") or {}
    sizes = ", ".join(f"{s} ({_count(params[s])})" if s in params else s for s in results.get("sizes") or params)
    return _Bullets([
        f"World: {_count(results['world_tokens'])} tokens; sizes: {sizes or _MISSING}",
        f"Tuning: {n_eval} grid-point evaluations ({seeds} seed(s) each) over {len(results['tuned'])} tuning problems",
        f"Overfitting sweep: {len(results.get('overfitting') or [])} runs",
        f"Failed: {n_failed} (see Failed runs)",
        f"Wall time: {_seconds(results.get('seconds'))}",
    ])


# ---------------------------------------------------------------------------------------------------------
# Entry point


def write_report(root: str | Path) -> dict[str, Path]:
    """Read ``<root>/results.json`` and write figures, ``report.md`` and ``report.html`` to ``<root>/report/``.

    Returns the written paths by name: each drawn figure's name (``overfitting``, ``loss_vs_params``,
    ``data_efficiency``, ``training_curves``), ``markdown`` and ``html``. A figure without data is skipped and
    the report says why.
    """
    root = Path(root)
    results = _load(root / "results.json")
    ci = float(((results.get("config") or {}).get("fit") or {}).get("ci", 0.95))
    figs = {
        "overfitting": _fig_overfitting(results),
        "loss_vs_params": _fig_loss_vs_params(results, ci),
        "data_efficiency": _fig_data_efficiency(results, ci),
        "training_curves": _fig_training_curves(results, root),
    }
    fig = {name: _Fig(name, caption, png) for name, (png, caption) in figs.items()}
    failed = _failed_runs(results, root)

    blocks: list[_Block] = [
        _Heading(f"Report: {results['name']}", 1),
        _Heading("Verdict"),
        _Bullets([str(v) for v in results["verdict"]] or ["no verdict (no recipes)"]),
        _Heading("Runs"),
        _totals(results, len(failed)),
        _Heading("Overfitting without regularisation"), fig["overfitting"],
        _Heading("Loss vs parameters"), fig["loss_vs_params"],
        _Heading("Scaling-law fits"),
        _Para(f"L(x) = E + A·x^-α with {ci:.0%} bootstrap intervals; leave-largest-out refits without the largest x "
              "and predicts it (the honest test of an extrapolation)."),
        _fits_table(results, ci),
        _Heading("Data efficiency"), fig["data_efficiency"],
    ]
    if results.get("multipliers"):
        blocks += [_Para(f"Multiplier = tokens the {results.get('baseline_recipe', 'standard')} recipe needs to reach "
                         "the loss, over the world's budget: from its fitted token law (power law) or by interpolating "
                         "its measured losses (never extrapolated)."),
                   _multipliers_table(results, ci)]
    else:
        blocks.append(_Para("No multipliers: the data-scaling baseline was not run."))
    blocks += [_Heading("Tuned hyperparameters"),
               _Para("Certified: every ±1-step grid neighbour of the optimum was trained and none is better."),
               *_tuned_tables(results),
               _Heading("Failed runs")]
    blocks.append(_Table(["context", "knobs", "run dir", "reason"], failed) if failed else _Para("No run failed."))
    blocks += [_Heading("Training curves"), fig["training_curves"]]

    out = root / "report"
    paths: dict[str, Path] = {}
    for name in _FIGURES:
        path = out / f"{name}.png"
        png = fig[name].png
        if png is None:
            # A figure from an earlier report would otherwise sit next to a report that says it was skipped.
            path.unlink(missing_ok=True)
            continue
        _write(path, png)
        paths[name] = path
    paths["markdown"], paths["html"] = out / "report.md", out / "report.html"
    _write(paths["markdown"], _to_markdown(blocks).encode("utf-8"))
    _write(paths["html"], _to_html(f"Report: {results['name']}", blocks).encode("utf-8"))
    return paths


def _write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
