"""The experiment report: PNG figures, ``report.md`` and one self-contained ``report.html`` from ``results.json``.

It mirrors "Pre-training under infinite compute": loss vs epochs per weight decay (why regularisation wins),
loss vs parameters with fitted asymptotes and bootstrap bands, the data-scaling baseline that turns losses
into data-efficiency multipliers, ensemble scaling (loss vs members K, single models vs ensembles at equal
total parameters, the joint N, K -> infinity limit), distillation into one model, downstream accuracy, and the
tuned hyperparameters with their local-optimality certificates.
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
_FIGURES = ("overfitting", "loss_vs_params", "data_efficiency", "loss_vs_k", "loss_vs_total_params", "training_curves")
_KNOB_LABELS = {"train.epochs": "epochs", "optim.lr": "LR", "optim.weight_decay": "WD"}
_TUNED_KEYS = {"recipe": str, "size": str, "params": int, "budget": int, "best": dict, "best_loss": float,
               "certified": bool, "evaluations": list}
_MISSING = "—"
_COMBINE = {"prob": "probability averaging", "logit": "logit averaging"}
_VARY = {"both": "initialisation and data order", "init": "initialisation only", "data": "data order only"}
_JOINT_MULTIPLIER = "ensemble joint limit"
_JOINT_COLOR = "darkmagenta"
_PAPER_RETAINED = 0.83  # Kim et al.: an 8x smaller distilled student keeps 83% of the ensembling gain


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

    if not isinstance(doc, dict):
        raise DataeffError(f"{path}: expected a JSON object at the top level")
    for key, kind in (("name", str), ("world_tokens", int), ("tuned", list), ("fits", dict), ("verdict", list)):
        _need(path, doc, key, kind, "")
    for i, entry in enumerate(doc["tuned"]):
        if not isinstance(entry, dict):
            raise DataeffError(f"{path}: field tuned[{i}] is not an object")
        for key, kind in _TUNED_KEYS.items():
            _need(path, entry, key, kind, f"tuned[{i}].")
    for section in ("data_scaling", "multipliers"):
        if not isinstance(doc.get(section, {}), dict):
            raise DataeffError(f"{path}: field {section} is not an object")
    for i, entry in enumerate(doc["tuned"]):
        for j, ev in enumerate(entry["evaluations"]):
            if not isinstance(ev, dict):
                raise DataeffError(f"{path}: field tuned[{i}].evaluations[{j}] is not an object")
            _need(path, ev, "values", dict, f"tuned[{i}].evaluations[{j}].")
            _need(path, ev, "loss", float, f"tuned[{i}].evaluations[{j}].")
    for label, m in doc.get("multipliers", {}).items():
        if not isinstance(m, dict):
            raise DataeffError(f"{path}: field multipliers.{label} is not an object")
    if not isinstance(doc.get("overfitting", []), list):
        raise DataeffError(f"{path}: field overfitting is not a list")
    for i, row in enumerate(doc.get("overfitting", [])):
        if not isinstance(row, dict):
            raise DataeffError(f"{path}: field overfitting[{i}] is not an object")
        for key in ("optim.weight_decay", "train.epochs", "loss"):
            _need(path, row, key, float, f"overfitting[{i}].")
    # Optional sections of later pipeline stages: absent (or null) when the stage did not run.
    for key, check in (("ensembles", _check_ensembles), ("distillation", _check_distillation), ("downstream", _check_downstream)):
        if doc.get(key) is not None:
            check(path, doc[key])
    return doc


def _need(path: Path, obj: dict[str, Any], key: str, kind: type, where: str, *, nullable: bool = False) -> Any:
    """``obj[key]`` if it is a ``kind`` (or null, when ``nullable``); otherwise an error naming the field."""
    value = obj.get(key)
    if nullable and value is None:
        return None
    # JSON keeps no int/float distinction a writer can rely on (a loss of exactly 3 is written 3).
    ok = isinstance(value, kind) or (kind is float and isinstance(value, int)) or (kind is int and isinstance(value, float))
    if not ok or (kind is not bool and isinstance(value, bool)):
        raise DataeffError(f"{path}: field {where}{key} is missing or not a {kind.__name__}" + (" or null" if nullable else ""))
    return value


def _numbers(path: Path, obj: dict[str, Any], key: str, where: str, *, nullable: bool = False) -> list[float] | None:
    values = _need(path, obj, key, list, where, nullable=nullable)
    if values is not None and not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise DataeffError(f"{path}: field {where}{key} is not a list of numbers")
    return values


def _object(path: Path, value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataeffError(f"{path}: field {where} is missing or not an object")
    return value


def _check_fit(path: Path, fit: Any, where: str) -> None:
    """A fit as pipeline._fit_with_intervals writes it: its parameters, or the reason it was refused."""
    _object(path, fit, where)
    if "refused" in fit:
        _need(path, fit, "refused", str, f"{where}.")
        return
    for key in ("E", "A", "alpha"):
        _need(path, fit, key, float, f"{where}.")


def _check_ensembles(path: Path, ens: Any) -> None:
    _object(path, ens, "ensembles")
    _need(path, ens, "combine", str, "ensembles.")
    _need(path, ens, "rule", str, "ensembles.")
    for size, e in _need(path, ens, "per_size", dict, "ensembles.").items():
        where = f"ensembles.per_size.{size}"
        _object(path, e, where)
        _need(path, e, "params", int, f"{where}.")
        _need(path, e, "single_loss", float, f"{where}.")
        _need(path, e, "member_values", dict, f"{where}.")
        # A size whose members failed has the error instead of losses and a K-law.
        if _need(path, e, "error", str, f"{where}.", nullable=True) is not None and "prob" not in e:
            continue
        ks = _numbers(path, e, "K", f"{where}.") or []
        if not ks:
            raise DataeffError(f"{path}: field {where}.K is empty")
        for key in ("prob", "logit"):
            losses = _numbers(path, e, key, f"{where}.", nullable=key == "logit")
            if losses is not None and len(losses) != len(ks):
                raise DataeffError(f"{path}: field {where}.{key} has {len(losses)} losses for {len(ks)} values of K")
        _need(path, e, "weighted", float, f"{where}.", nullable=True)
        _numbers(path, e, "weights", f"{where}.", nullable=True)
        _numbers(path, e, "member_losses", f"{where}.")
        _need(path, e, "ensemble_file", str, f"{where}.", nullable=True)
        _check_fit(path, e.get("k_fit"), f"{where}.k_fit")
    joint = ens.get("joint_limit")
    if joint is None:
        return
    _object(path, joint, "ensembles.joint_limit")
    if "refused" in joint:
        _need(path, joint, "refused", str, "ensembles.joint_limit.")
        return
    _need(path, joint, "E", float, "ensembles.joint_limit.")
    if _pair(joint.get("E_ci")) is None:
        raise DataeffError(f"{path}: field ensembles.joint_limit.E_ci is missing or not a [lo, hi] pair")
    if joint.get("n_fit") is not None:
        _check_fit(path, joint["n_fit"], "ensembles.joint_limit.n_fit")


def _check_distillation(path: Path, d: Any) -> None:
    _object(path, d, "distillation")
    _need(path, d, "size", str, "distillation.")
    _need(path, d, "params", int, "distillation.")
    for key in ("single_loss", "ensemble_loss"):
        _need(path, d, key, float, "distillation.")
    teacher = _object(path, d.get("teacher"), "distillation.teacher")
    _need(path, teacher, "K", int, "distillation.teacher.")
    _need(path, teacher, "combine", str, "distillation.teacher.", nullable=True)
    for i, s in enumerate(_need(path, d, "students", list, "distillation.")):
        where = f"distillation.students[{i}]"
        _object(path, s, where)
        for key in ("name", "kind"):
            _need(path, s, key, str, f"{where}.")
        _need(path, s, "loss", float, f"{where}.")
        _need(path, s, "retained", float, f"{where}.", nullable=True)
        _need(path, s, "details", dict, f"{where}.", nullable=True)
        for key in ("run_dir", "error"):
            _need(path, s, key, str, f"{where}.", nullable=True)


def _check_downstream(path: Path, ds: Any) -> None:
    _object(path, ds, "downstream")
    tasks = _need(path, ds, "tasks", list, "downstream.")
    if not all(isinstance(t, str) for t in tasks):
        raise DataeffError(f"{path}: field downstream.tasks is not a list of task names")
    _need(path, ds, "limit", int, "downstream.", nullable=True)
    for i, m in enumerate(_need(path, ds, "models", list, "downstream.")):
        where = f"downstream.models[{i}]"
        _object(path, m, where)
        for key in ("label", "kind"):
            _need(path, m, key, str, f"{where}.")
        for task, r in _need(path, m, "results", dict, f"{where}.").items():
            _object(path, r, f"{where}.results.{task}")
            _need(path, r, "n", int, f"{where}.results.{task}.")
            _need(path, r, "chance", float, f"{where}.results.{task}.", nullable=True)


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


def _is_limit(label: str) -> bool:
    """A multiplier target that is a fitted limit (dashed in the figure), not a measured loss."""
    return label.endswith("asymptote") or label == _JOINT_MULTIPLIER


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
        ax.axhline(loss, color=color, ls="--" if _is_limit(label) else ":", lw=1.4, label=text)
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
    joint = ", the ensembles' joint limit (dashed)" if _JOINT_MULTIPLIER in multipliers else ""
    caption = (f"The {baseline} recipe's best loss per token budget"
               + (f" with its fitted E + A·D^-α and {ci:.0%} bootstrap band" if fitted else
                  f" (fit refused: {ds.get('refused', 'no fit')})")
               + f". Horizontal lines: each recipe's asymptote (dashed){joint} and best measured loss (dotted); diamonds "
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


def _per_size(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ensembles' per-size entries, smallest model first (the pipeline keeps its own order)."""
    per_size = (results.get("ensembles") or {}).get("per_size") or {}
    return dict(sorted(per_size.items(), key=lambda item: item[1]["params"]))


def _ensemble_sizes(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-size entries that have at least one finite loss to draw."""
    return {size: e for size, e in _per_size(results).items() if any(map(_finite, e.get("prob") or []))}


def _ensemble_config(results: dict[str, Any]) -> dict[str, Any]:
    return (results.get("config") or {}).get("ensembles") or {}


def _single_recipe(results: dict[str, Any]) -> str:
    """The recipe whose tuned model is each size's single-model reference (and the members' starting point)."""
    return str(_ensemble_config(results).get("recipe", "regularized"))


def _combine_text(combine: str) -> str:
    return _COMBINE.get(combine, f"{combine} averaging")


def _rule_text(results: dict[str, Any]) -> str:
    ens, cfg = results["ensembles"], _ensemble_config(results)
    single = f"the tuned {_single_recipe(results)} model"
    rule = {
        "paper": f"the paper's rule ({cfg.get('epochs_factor', 2.0):g}× the epochs and {cfg.get('weight_decay_factor', 0.5):g}× "
                 f"the weight decay of {single}, its other knobs)",
        "tuned": f"the hyperparameters of {single}",
        "explicit": "explicitly configured hyperparameters",
    }.get(ens["rule"], f"the member rule {ens['rule']!r}")
    vary = ens.get("vary")
    return rule + (f", seeds differing in {_VARY.get(vary, vary)}" if isinstance(vary, str) else "")


def _k_ticks(ax: Axes, ks: Iterable[float], k_top: float) -> None:
    """Integer ticks on a log2 axis: the measured K, if few, and the powers of two out to the curves' end."""
    measured = set(ks)
    ticks = sorted({*(measured if len(measured) <= 8 else ()), *(2.0**i for i in range(int(math.log2(k_top)) + 1))})
    ax.set_xticks(ticks, [f"{k:g}" for k in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _fig_loss_vs_k(results: dict[str, Any], ci: float) -> tuple[bytes | None, str]:
    sizes = _ensemble_sizes(results)
    if not sizes:
        return None, "Ensemble-scaling figure skipped: no ensemble has a finite loss."
    ens = results["ensembles"]
    k_max = max(max(e["K"]) for e in sizes.values())
    x = np.geomspace(1, 4 * k_max, 200)
    fig, ax = _new_figure(8.0, 5.0)
    y_seen: list[float] = []
    notes = [f"{size} not drawn ({e.get('error') or 'no finite loss'})" for size, e in _per_size(results).items() if size not in sizes]
    refused: dict[str, list[str]] = {}  # reason -> sizes, since one reason (too few K) usually holds for all
    fitted = logit_drawn = weighted_drawn = False
    for color, (size, e) in zip(_colors(len(sizes)), sizes.items(), strict=True):
        fit = e["k_fit"]
        label = f"{size} (N={_count(e['params'])})"
        if _has_fit(fit):
            fitted = True
            label += f": E_N={fit['E']:.4f} {_interval(fit.get('E_ci'))}, α={fit['alpha']:.3g}"
            ax.plot(x, _curve(fit, x), "-", color=color, lw=1.2)
            band = _band(fit, x, ci)
            if band is not None:
                ax.fill_between(x, *band, color=color, alpha=0.15, lw=0)
            ax.axhline(fit["E"], color=color, ls=":", lw=1.4)
            y_seen.append(fit["E"])
        else:
            label += " (no K-law)"
            refused.setdefault(str(fit.get("refused", "no fit")), []).append(size)
        pts = [(k, loss) for k, loss in zip(e["K"], e["prob"], strict=True) if _finite(loss)]
        ax.plot(*zip(*pts, strict=True), "o", color=color, ms=7, zorder=3, label=label)
        y_seen += [loss for _, loss in pts]
        logit = [(k, loss) for k, loss in zip(e["K"], e.get("logit") or [], strict=False) if _finite(loss)]
        if logit:
            ax.plot(*zip(*logit, strict=True), "s--", color=color, mfc="none", ms=6, lw=0.8, mew=1.4, zorder=3)
            y_seen += [loss for _, loss in logit]
            logit_drawn = True
        if _finite(e.get("weighted")):
            ax.plot([max(e["K"])], [e["weighted"]], "*", color=color, mec="k", mew=0.5, ms=12, zorder=4)
            y_seen.append(e["weighted"])
            weighted_drawn = True
    _set_ylim(ax, y_seen)
    ax.set_xscale("log", base=2)
    # Without a K-law nothing extends past the measured K, so neither does the axis.
    k_top = x[-1] if fitted else k_max * 1.2
    if not fitted:
        ax.set_xlim(0.9, k_top)
    _k_ticks(ax, (k for e in sizes.values() for k in e["K"]), k_top)
    ax.set_xlabel("ensemble members K (log2)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Ensemble scaling: loss vs members per model size", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    for drawn, marker, ls, mfc, text in (
        (True, "o", "", "0.3", _combine_text("prob")),
        (fitted, "", "-", "0.3", f"K-law fitted on {_combine_text(ens['combine'])}, {ci:.0%} band"),
        (logit_drawn, "s", "--", "none", _combine_text("logit")),
        (weighted_drawn, "*", "", "0.3", "weighted probability averaging at the largest K"),
        (fitted, "", ":", "0.3", "asymptote E_N (K → ∞)"),
    ):
        if drawn:
            handles.append(Line2D([], [], marker=marker, ls=ls, color="0.3", mfc=mfc, mew=1.4))
            labels.append(text)
    ax.legend(handles, labels, fontsize=7, loc="best")
    caption = (f"Loss of the ensemble of the first K members by {_combine_text('prob')} (filled)"
               + (f" and {_combine_text('logit')} (hollow, dashed)" if logit_drawn else "")
               + f", with the K-law E + A·K^-α fitted on {_combine_text(ens['combine'])} extended to 4× the largest K, "
               f"its {ci:.0%} bootstrap band and each size's asymptote E_N (dotted). Members: {_rule_text(results)}.")
    notes += [f"{', '.join(names)}: K-law refused ({reason})" for reason, names in refused.items()]
    if notes:
        caption += " " + "; ".join(notes) + "."
    return _png(fig), caption


def _fig_loss_vs_total_params(results: dict[str, Any], ci: float) -> tuple[bytes | None, str]:
    sizes = _ensemble_sizes(results)
    if not sizes:
        return None, "Single-models-vs-ensembles figure skipped: no ensemble has a finite loss."
    ens = results["ensembles"]
    totals = [k * e["params"] for e in sizes.values() for k in e["K"]]
    x = np.geomspace(min(e["params"] for e in sizes.values()) / 1.5, max(totals) * 4, 300)
    fig, ax = _new_figure(8.0, 5.0)
    recipe = _single_recipe(results)
    single = [(e["params"], e["single_loss"]) for e in sizes.values() if _finite(e["single_loss"])]
    y_seen = [loss for _, loss in single]
    if single:
        ax.plot(*zip(*single, strict=True), "o", color="k", ms=8, zorder=4, label=f"tuned single models ({recipe})")
    fit = results["fits"].get(recipe)
    if _has_fit(fit):
        ax.plot(x, _curve(fit, x), "-", color="k", lw=1.2, label=f"{recipe} N-law, α={fit['alpha']:.3g}")
        band = _band(fit, x, ci)
        if band is not None:
            ax.fill_between(x, *band, color="k", alpha=0.08, lw=0)
        ax.axhline(fit["E"], color="k", ls="--", lw=1, label=f"{recipe} asymptote {fit['E']:.4f} {_interval(fit.get('E_ci'))}")
        y_seen.append(fit["E"])
    for color, (size, e) in zip(_colors(len(sizes)), sizes.items(), strict=True):
        pts = [(k * e["params"], loss) for k, loss in zip(e["K"], e["prob"], strict=True) if _finite(loss)]
        ks = [k for k, loss in zip(e["K"], e["prob"], strict=True) if _finite(loss)]
        ax.plot(*zip(*pts, strict=True), "o-", color=color, ms=5, lw=1.2, zorder=3,
                label=f"{size} ensembles, K = {min(ks):g}–{max(ks):g}")
        ax.annotate(f"K={max(ks):g}", pts[-1], textcoords="offset points", xytext=(6, -12), fontsize=7, color=color,
                    zorder=5)
        y_seen += [loss for _, loss in pts]
    joint = ens.get("joint_limit") or {}
    if "E" in joint:
        lo, hi = _pair(joint["E_ci"]) or (joint["E"], joint["E"])
        ax.axhline(joint["E"], color=_JOINT_COLOR, ls="-.", lw=1.4,
                   label=f"joint limit (N, K → ∞) {joint['E']:.4f} {_interval(joint['E_ci'])}")
        if math.isfinite(lo) and math.isfinite(hi):
            ax.axhspan(lo, hi, color=_JOINT_COLOR, alpha=0.12, lw=0)
        y_seen.append(joint["E"])
    _set_ylim(ax, y_seen)
    ax.set_xscale("log")
    ax.set_xlabel("total parameters K·N (log)")
    ax.set_ylabel("held-out loss")
    ax.set_title("Single models vs ensembles at equal total parameters", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    caption = (f"Loss against total parameters: the tuned single models ({recipe}, black)"
               + (f" with their fitted N-law, its {ci:.0%} band and asymptote (dashed)" if _has_fit(fit) else "")
               + f", and per size the ensembles of K members ({_combine_text('prob')}) at K·N parameters.")
    if "E" in joint:
        caption += f" Dash-dotted, shaded: the joint limit with both N and K taken to infinity and its {ci:.0%} interval."
    return _png(fig), caption


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
    rows: list[list[str | _Cell]] = [[label, _loss(m.get("loss")), *_multiplier_cells(m)]
                                     for label, m in (results.get("multipliers") or {}).items()]
    return _Table(["target", "loss", f"power law [{ci:.0%} CI]", "interpolated"], rows)


def _multiplier_cells(m: dict[str, Any]) -> list[str | _Cell]:
    """A multiplier's power-law value with its interval, and its interpolated value (why it is missing as a note)."""
    pl = f"{_mult(m.get('power_law'))} {_interval(m.get('power_law_ci'), _mult)}" if "power_law" in m else _MISSING
    note = m.get("interpolated_note") or ""
    return [pl, _Cell(_mult(m.get("interpolated")), note)]


def _ensemble_tables(results: dict[str, Any], ci: float, root: Path) -> list[_Block]:
    ens = results["ensembles"]
    per_size = _per_size(results)
    rows: list[list[str | _Cell]] = []
    for size, e in per_size.items():
        head: list[str | _Cell] = [_Cell(size, _shown_path(root, e.get("ensemble_file") or "")), _count(e["params"]),
                                   _knobs_text(e["member_values"]), _loss(e["single_loss"])]
        if "prob" not in e:
            rows.append([*head, _Cell("failed", e["error"]), *[_MISSING] * 6])
            continue
        top = e["K"].index(max(e["K"]))
        members = e["member_losses"]
        member = _Cell(_loss(float(np.mean(members))), "members: " + ", ".join(map(_loss, members))) if members else _Cell(_MISSING)
        weights = e.get("weights")
        weighted = _Cell(_loss(e.get("weighted")), "weights " + ", ".join(f"{w:.3f}" for w in weights) if weights else "")
        fit = e["k_fit"]
        if _has_fit(fit):
            asymptote: list[str | _Cell] = [f"{_loss(fit['E'])} {_interval(fit.get('E_ci'))}",
                                            f"{_sig(fit['alpha'])} {_interval(fit.get('alpha_ci'), _sig)}"]
        else:
            asymptote = [_Cell("refused", str(fit.get("refused", "no fit"))), _MISSING]
        logit = e.get("logit")
        rows.append([*head, member, f"{e['K'][top]:g}", _loss(e["prob"][top]), _loss(logit[top]) if logit else _MISSING,
                     weighted, *asymptote])
    headers = ["size", "N", "member knobs", "single (tuned)", "member (mean)", "max K", "prob", "logit", "weighted",
               f"E_N [{ci:.0%} CI]", "α"]
    blocks: list[_Block] = [
        _Para(f"Each size's ensemble: members trained with {_rule_text(results)}; the loss of all max K members by "
              "probability, logit and weighted probability averaging (weights learned on a held-out slice), and the "
              f"K-law L(K) = E_N + A·K^-α fitted on {_combine_text(ens['combine'])}, whose E_N is the loss of "
              "infinitely many members of that size."),
        _Table(headers, rows),
    ]
    with_logit = {size: e for size, e in per_size.items() if e.get("logit")}
    if not with_logit:
        return [*blocks, _Para("Logit averaging was not evaluated.")]
    ks = sorted({k for e in with_logit.values() for k in e["K"]})
    diff_rows: list[list[str | _Cell]] = []
    for size, e in with_logit.items():
        # + 0.0 turns the -0.0 of rounding noise (K = 1, where both are the one member) into 0.
        diffs = {k: round(p - q, 4) + 0.0 for k, p, q in zip(e["K"], e["prob"], e["logit"], strict=True)
                 if _finite(p) and _finite(q)}
        diff_rows.append([size, *(f"{diffs[k]:+.4f}" if k in diffs else _MISSING for k in ks)])
    return [*blocks,
            _Heading("Probability vs logit averaging", 3),
            _Para("Loss with probability averaging minus loss with logit averaging, for the ensemble of the first K "
                  "members: negative where averaging probabilities is better."),
            _Table(["size", *(f"K={k:g}" for k in ks)], diff_rows)]


def _joint_limit_blocks(results: dict[str, Any], ci: float) -> list[_Block]:
    joint = results["ensembles"].get("joint_limit")
    if joint is None:
        return [_Para("No joint limit was fitted.")]
    if "refused" in joint:
        return [_Para(f"No joint limit: {joint['refused']}.")]
    n_fit = joint.get("n_fit") or {}
    m = (results.get("multipliers") or {}).get(_JOINT_MULTIPLIER)
    row: list[str | _Cell] = [f"{_loss(joint['E'])} {_interval(joint['E_ci'])}", _sig(n_fit.get("A")), _sig(n_fit.get("alpha")),
                              *(_multiplier_cells(m) if m else [_MISSING, _MISSING])]
    return [_Para("Joint limit: the N-law E + A·N^-α fitted to the sizes' K-law asymptotes E_N; its E is the loss with "
                  "both the model size N and the member count K taken to infinity. The multiplier is the tokens the "
                  f"{results.get('baseline_recipe', 'standard')} recipe needs to reach it, over the world's budget."),
            _Table([f"E (N, K → ∞) [{ci:.0%} CI]", "A", "α", f"multiplier, power law [{ci:.0%} CI]", "interpolated"], [row])]


def _retained(v: Any) -> str:
    return f"{v:.1%}" if _finite(v) else _MISSING


def _distillation_blocks(results: dict[str, Any], root: Path) -> list[_Block]:
    d = results["distillation"]
    teacher = d["teacher"]
    combine = teacher.get("combine")
    rows: list[list[str | _Cell]] = [
        [_Cell(f"teacher: {teacher['K']}-member {d['size']} ensemble", _shown_path(root, teacher.get("ensemble_file") or "")),
         "ensemble" + (f" ({_combine_text(combine)})" if combine else ""), _loss(d["ensemble_loss"]), _retained(1.0), ""],
        [f"single {d['size']} (tuned)", "single", _loss(d["single_loss"]), _retained(0.0), ""],
    ]
    for s in d["students"]:
        loss = _Cell("failed", s["error"]) if s.get("error") else _Cell(_loss(s["loss"]))
        # A chain link's teacher is the previous link's run directory.
        details = ", ".join(f"{k}={_shown_path(root, v) if isinstance(v, str) else _knob(k, v)}"
                            for k, v in (s.get("details") or {}).items())
        rows.append([_Cell(s["name"], _shown_path(root, s.get("run_dir") or "")), s["kind"], loss, _retained(s.get("retained")),
                     details])
    return [_Para(f"Students of one {d['size']} model's size (N={_count(d['params'])}) trained from the ensemble teacher. "
                  "Retained = (L_single − L_student) / (L_single − L_ensemble): the share of the ensemble's gain over the "
                  "tuned single model that the student keeps (0% is no better than the single model, 100% matches the "
                  f"teacher). The paper's distilled student, 8× smaller than its teacher ensemble, retains {_PAPER_RETAINED:.0%}."),
            _Table(["model", "kind", "loss", "retained", "settings"], rows)]


def _metric_cell(metric: str, value: Any, stderr: Any) -> str:
    if not _finite(value):
        return _MISSING
    if metric.startswith("acc"):
        return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if _finite(stderr) else "")
    return _sig(value) + (f" ± {_sig(stderr)}" if _finite(stderr) else "")


def _downstream_blocks(results: dict[str, Any]) -> list[_Block]:
    ds = results["downstream"]
    models = ds["models"]
    tasks = list(dict.fromkeys([*ds["tasks"], *(t for m in models for t in m["results"])]))
    # A task's metrics are its numeric (or null) entries; item count, chance and stderrs go elsewhere, and
    # nested breakdowns (BLiMP's per-paradigm accuracies) are too fine for this table.
    columns = [(task, metric) for task in tasks for metric in dict.fromkeys(
        k for m in models for k, v in (m["results"].get(task) or {}).items()
        if k not in ("n", "chance") and not k.endswith("_stderr") and (v is None or isinstance(v, int | float)))]
    rows: list[list[str | _Cell]] = []
    for m in models:
        cells = []
        for task, metric in columns:
            r = m["results"].get(task) or {}
            cells.append(_metric_cell(metric, r.get(metric), r.get(f"{metric}_stderr")))
        rows.append([m["label"], m["kind"], *cells])
    counts = []
    for task in tasks:
        found = [m["results"][task] for m in models if task in m["results"]]
        n = "/".join(str(v) for v in dict.fromkeys(r["n"] for r in found))
        chance = next((r["chance"] for r in found if _finite(r.get("chance"))), None)
        counts.append(f"{task} {n} items" + (f", chance {chance:.1%}" if chance is not None else ""))
    limit = ds.get("limit")
    scope = f"at most {limit} items per task (a seeded random subset)" if limit else "every item of each task"
    return [_Para(f"Zero-shot log-likelihood scoring on {scope}: {'; '.join(counts)}. Accuracies in % ± standard error; "
                  "acc_norm normalises by the answer's length in bytes, perplexity is per word."),
            _Table(["model", "kind", *(f"{task} {metric}" + (" (%)" if metric.startswith("acc") else "") for task, metric in columns)],
                   rows)]


def _shown_path(root: Path, path: str) -> str:
    """A recorded path relative to the report's root when it lies under it (as the pipeline records them)."""
    return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else path


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
        rows.append([context, _knobs_text(values), _shown_path(root, run_dir) if run_dir else _MISSING, reason])

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
    ``data_efficiency``, ``loss_vs_k``, ``loss_vs_total_params``, ``training_curves``), ``markdown`` and
    ``html``. A figure without data is skipped and the report says why; the ensemble, distillation and
    downstream sections appear only when results.json has them.
    """
    root = Path(root)
    results = _load(root / "results.json")
    ci = float(((results.get("config") or {}).get("fit") or {}).get("ci", 0.95))
    figs = {
        "overfitting": _fig_overfitting(results),
        "loss_vs_params": _fig_loss_vs_params(results, ci),
        "data_efficiency": _fig_data_efficiency(results, ci),
        "loss_vs_k": _fig_loss_vs_k(results, ci),
        "loss_vs_total_params": _fig_loss_vs_total_params(results, ci),
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
    if results.get("ensembles") is not None:
        blocks += [_Heading("Ensemble scaling"), fig["loss_vs_k"], *_ensemble_tables(results, ci, root),
                   _Heading("Single models vs ensembles"), fig["loss_vs_total_params"], *_joint_limit_blocks(results, ci)]
    if results.get("distillation") is not None:
        blocks += [_Heading("Distillation"), *_distillation_blocks(results, root)]
    if results.get("downstream") is not None:
        blocks += [_Heading("Downstream tasks"), *_downstream_blocks(results)]
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
