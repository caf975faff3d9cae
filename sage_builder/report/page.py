"""``sage report RUN`` -> ``RUN/report.html``: one static, self-contained page of a run.

It reads only what the stages wrote (manifests, report/quality/eval JSON, Parquet tables, PNGs):
each stage's state and summary, the charts (``plots.py``, also saved as ``RUN/report/*.png``),
data-quality warnings, lineage and timings. No server, no script, no external request: CSS is
inline and every image is a data URI. Images of generated content (contact sheet, grids) are blurred
in their pixels unless ``unblur``, so the page itself never carries them unblurred by default.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_builder.errors import SageError
from sage_builder.public import public_data, public_text
from sage_builder.store import RunDir

log = logging.getLogger("sage.report")
REPORT_NAME = "report.html"
ASSETS = "report"
BLUR_RADIUS = 9
CONTACT_PAIRS = 4
# A held-out implicit accuracy this close to chance (0.5) says the adapter learned no preference.
CHANCE_MARGIN = 0.05
REJECT_RATE_WARN = 0.3

CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1a202c;background:#f7fafc}
header{background:#1a365d;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:24px}
header p{margin:2px 0;opacity:.9}header code{background:#2c5282;color:#fff}main{padding:8px 28px 40px;max-width:1100px}
nav{padding:8px 28px;background:#e2e8f0;font-size:14px}nav a{margin-right:14px;color:#2b6cb0}
section{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:6px 18px 14px;margin:16px 0}
h2{font-size:19px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}h3{font-size:16px;margin:12px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #e2e8f0;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#edf2f7}code{font-size:12px;background:#edf2f7;padding:0 3px}
.state-done{color:#276749;font-weight:600}.state-missing{color:#718096}.state-stale,.state-modified,
.state-partial{color:#c05621;font-weight:600}.warning{background:#fffaf0;border-left:4px solid #dd6b20;
padding:6px 10px;margin:6px 0}.ok{background:#f0fff4;border-left:4px solid #38a169;padding:6px 10px}
.cw{background:#fff5f5;border:1px solid #feb2b2;color:#742a2a;padding:8px 12px;border-radius:4px}
img{max-width:100%;border:1px solid #e2e8f0;margin:6px 0}.muted{color:#718096;font-size:13px}
"""


@dataclass
class Page:
    """What the report collects while reading the run."""

    run: RunDir
    unblur: bool
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (stage, line)
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (id, title, html)
    assets: dict[str, bytes] = field(default_factory=dict)

    def warn(self, stage: str, line: str) -> None:
        self.warnings.append((stage, public_text(line, self.run.root)))

    def image(self, name: str, data: bytes, alt: str, harmful: bool = False) -> str:
        """An <img> with ``data`` inline (blurred first when ``harmful`` and not ``unblur``)."""
        if harmful and not self.unblur:
            data = blurred(data)
            alt += " (blurred; sage report --unblur shows it)"
        self.assets[name] = data
        encoded = base64.b64encode(data).decode()
        return f'<img src="data:image/png;base64,{encoded}" alt="{esc(alt)}" title="{esc(alt)}">'


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def blurred(png: bytes) -> bytes:
    import io

    from PIL import Image, ImageFilter

    with Image.open(io.BytesIO(png)) as image:
        out = io.BytesIO()
        image.convert("RGB").filter(ImageFilter.GaussianBlur(BLUR_RADIUS)).save(out, format="PNG")
    return out.getvalue()


def table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, Raw) else esc(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class Raw(str):
    """Table cell HTML that is already escaped."""


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, sort_keys=True, default=str)
        return text if len(text) <= 160 else text[:157] + "…"
    return str(value)


def stats_table(stats: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    rows = [[key, Raw(f"<code>{esc(_fmt(value))}</code>")] for key, value in stats.items() if key not in skip]
    return table(["statistic", "value"], rows) if rows else '<p class="muted">no statistics recorded</p>'


def _stage_states(page: Page) -> list[list[Any]]:
    from sage_builder.stages import STAGE_ORDER, get_stage
    from sage_builder.stages.base import stage_status

    config = None
    saved = page.run.root / "config.yaml"
    if saved.exists():
        from sage_builder.config import load_config

        try:
            config = load_config(saved)
        except SageError as exc:
            page.warn("run", f"config.yaml cannot be read ({exc}); staleness against it is not checked")
    rows = []
    for number, name in enumerate(STAGE_ORDER, start=1):
        manifest = page.run.stage(name).read_manifest()
        try:
            status = stage_status(get_stage(name), config, page.run)
        except Exception as exc:  # noqa: BLE001 - a stage package missing from this install must not stop the page
            rows.append([number, name, "unknown", "", "", f"({exc.__class__.__name__}: {str(exc)[:80]})"])
            continue
        if status.state in ("stale", "modified", "partial"):
            page.warn(name, f"{status.state}: {status.reason}")
        state = status.state
        if name == "publish" and manifest is not None and manifest.stats.get("dry_run"):
            state = "dry run"
        rows.append([number, Raw(f'<a href="#stage-{name}">{esc(name)}</a>'),
                     Raw(f'<span class="state-{esc(status.state)}">{esc(state)}</span>'),
                     _fmt(manifest.seconds) + " s" if manifest and manifest.seconds is not None else "",
                     time.strftime("%Y-%m-%d %H:%M", time.gmtime(manifest.finished_at))
                     if manifest and manifest.finished_at else "",
                     row_summary(manifest.rows) if manifest else ""])
    return rows


def row_summary(rows: dict[str, int]) -> str:
    """Rows per table, shards of one config/split summed (``data/preferences/train: 140 (1 file)``)."""
    import re

    totals: dict[str, list[int]] = {}
    for rel, n in rows.items():
        key = re.sub(r"-\d{5}-of-\d{5}\.parquet$|/shard-\d+\.parquet$|\.parquet$", "", rel).removeprefix("dataset/")
        totals.setdefault(key, [0, 0])
        totals[key][0] += n
        totals[key][1] += 1
    return ", ".join(f"{k}: {n}" + (f" ({files} files)" if files > 1 else "") for k, (n, files) in sorted(totals.items()))


def _profiles(page: Page) -> str:
    stage = page.run.stage("profiles")
    report = _json(stage.file("report.json")) or {}
    parts = []
    for line in report.get("warnings") or []:
        page.warn("profiles", line)
    bans = report.get("bans") or {}
    rates = bans.get("ban_rate")
    if not rates:
        rates, users = _ban_rates_from_profiles(stage.file("profiles.parquet"))
        bans = {"users": users}
    if rates:
        from sage_builder.report.plots import ban_rates_plot

        png = ban_rates_plot(rates, bans.get("published_ban_rate"), bans.get("users"))
        parts.append(page.image("ban_rates.png", png, "banned share per category vs the published rates"))
        if bans.get("mean_banned") is not None:
            parts.append(f"<p>Mean banned per user {esc(bans['mean_banned'])} (published "
                         f"{esc(bans.get('published_mean_banned'))}); {esc(bans.get('ban_nothing'))} user(s) ban "
                         f"nothing (published {esc(bans.get('published_ban_nothing'))} of 1,000).</p>")
    tsne = stage.file("tsne.png")
    if tsne.exists():
        parts.append("<h3>User embeddings (t-SNE)</h3>" + page.image("tsne.png", tsne.read_bytes(), "t-SNE of users"))
    return "".join(parts)


def _ban_rates_from_profiles(path: Path) -> tuple[dict[str, float], int]:
    import pyarrow.parquet as pq

    if not path.exists():
        return {}, 0
    banned = [b or [] for b in pq.read_table(path, columns=["banned"]).column("banned").to_pylist()]
    categories = sorted({c for b in banned for c in b})
    n = len(banned) or 1
    return {c: sum(c in b for b in banned) / n for c in categories}, len(banned)


def _rejects(page: Page) -> str:
    import pyarrow.parquet as pq

    counts: dict[str, dict[str, int]] = {}
    lines = []
    for name, done_rows in (("profiles", "profiles.parquet"), ("prompts", "pairs.parquet")):
        stage = page.run.stage(name)
        path = stage.file("rejects.parquet")
        manifest = stage.read_manifest()
        if not path.exists() or manifest is None:
            continue
        reasons = pq.read_table(path, columns=["reason"]).column("reason").to_pylist()
        counts[name] = {}
        for reason in reasons:
            counts[name][reason or "unknown"] = counts[name].get(reason or "unknown", 0) + 1
        kept = manifest.rows.get(done_rows, 0)
        rate = len(reasons) / (len(reasons) + kept) if reasons or kept else 0.0
        lines.append(f"{name}: {len(reasons)} rejected attempt(s) against {kept} kept ({rate:.0%} of attempts)")
        if rate > REJECT_RATE_WARN:
            page.warn(name, f"{rate:.0%} of attempts were rejected ({len(reasons)} of {len(reasons) + kept}); "
                            f"see the rejects chart and {name}/rejects.parquet")
    if not counts:
        return ""
    from sage_builder.report.plots import rejects_plot

    return ("<h3>Rejects</h3><p>" + "<br>".join(esc(x) for x in lines) + "</p>"
            + page.image("rejects.png", rejects_plot(counts), "rejected items per reason"))


def _screening(page: Page, stats: dict[str, Any]) -> str:
    screen = stats.get("screen")
    if not screen:
        return '<p class="muted">Screening: not run (render.screen disabled).</p>'
    totals = screen.get("totals") or {}
    pairs = totals.get("pairs") or 0
    rows = []
    for outcome in ("ok", "safe_flagged", "unsafe_clean", "error"):
        n = totals.get(outcome, 0)
        rows.append([outcome, n, f"{n / pairs:.0%}" if pairs else ""])
    for outcome in ("safe_flagged", "error"):
        if pairs and totals.get(outcome, 0) / pairs > 0.1:
            page.warn("render", f"screening: {totals[outcome]} of {pairs} pairs {outcome}")
    return "<h3>Screening</h3>" + table(["outcome", "pairs", "share"], rows)


def _render(page: Page) -> str:
    stage = page.run.stage("render")
    manifest = stage.read_manifest()
    if manifest is None or not stage.file("index.parquet").exists():
        return ""
    import io

    from sage_builder.stages.render.contact_sheet import contact_sheet

    parts = [_screening(page, manifest.stats)]
    try:
        sheet = contact_sheet(stage.path, CONTACT_PAIRS, tile=192, blur=0 if page.unblur else BLUR_RADIUS)
    except Exception as exc:  # noqa: BLE001 - a viewing aid must not stop the report
        page.warn("render", f"contact sheet not drawn ({exc.__class__.__name__}: {str(exc)[:120]})")
        return "".join(parts)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    parts.append(f"<h3>First {CONTACT_PAIRS} pairs</h3>"
                 + page.image("contact_sheet.png", buffer.getvalue(), "contact sheet of rendered pairs"))
    return "".join(parts)


def _label(page: Page) -> str:
    manifest = page.run.stage("label").read_manifest()
    if manifest is None:
        return ""
    share = manifest.stats.get("chosen_safe_share")
    if isinstance(share, (int, float)) and not 0.2 <= share <= 0.8:
        page.warn("label", f"chosen = safe in {share:.0%} of records: the labels lean to one side")
    problems = (manifest.stats.get("imported") or {}).get("problems") or {}
    for kind, n in problems.items():
        page.warn("label", f"import: {n} {kind} problem(s) (label/import_problems.txt)")
    return ""


def _train(page: Page) -> str:
    import pyarrow.parquet as pq

    stage = page.run.stage("train")
    if stage.read_manifest() is None:
        return ""
    parts = []
    evaluation = _json(stage.file("eval.json")) or {}
    accuracy = evaluation.get("implicit_accuracy")
    metrics_path = stage.file("metrics.parquet")
    if metrics_path.exists():
        from sage_builder.report.plots import training_curves_plot

        metrics = pq.read_table(metrics_path).to_pylist()
        if metrics:
            parts.append(page.image("training_curves.png", training_curves_plot(metrics, accuracy),
                                    "training loss and implicit accuracy"))
    if accuracy is not None:
        chance = evaluation.get("chance_level", 0.5)
        parts.append(f"<p>Held-out implicit accuracy <b>{accuracy:.3f}</b> on {esc(evaluation.get('records'))} "
                     f"record(s) of <code>{esc(evaluation.get('split'))}</code> (chance {esc(chance)}; ties count "
                     f"half).</p>")
        if abs(accuracy - chance) <= CHANCE_MARGIN:
            page.warn("train", f"held-out implicit accuracy {accuracy:.3f} is at chance ({chance}): the adapter "
                               f"has learned no preference yet")
        rows = [[f"{group}: {name}", v.get("records"), f"{v.get('implicit_accuracy', 0):.3f}", v.get("ties")]
                for group in ("by_reason", "by_category") for name, v in (evaluation.get(group) or {}).items()]
        if rows:
            parts.append(table(["records", "n", "implicit accuracy", "ties"], rows))
    grid = stage.file("grid.png")
    if grid.exists():
        parts.append("<h3>Levels x prompts (grid.png)</h3>"
                     + page.image("grid.png", grid.read_bytes(), "images rendered with the adapter", harmful=True))
    return "".join(parts)


def _eval(page: Page) -> str:
    """The eval stage's ``summary.json`` and plots, read as files (the stage is another package's)."""
    stage = page.run.stage("eval")
    summary = _json(stage.file("summary.json"))
    if summary is None:
        return ""
    parts = [stats_table(public_data(summary, page.run.root) if isinstance(summary, dict) else {"summary": summary})]
    for warning in (summary.get("warnings") or []) if isinstance(summary, dict) else []:
        page.warn("eval", str(warning))
    for png in sorted(stage.path.glob("*.png")):
        harmful = not png.name.startswith(("ip_", "plot", "curve"))  # grids of generated images
        parts.append(f"<h3>{esc(png.name)}</h3>" + page.image(f"eval_{png.name}", png.read_bytes(), png.name,
                                                              harmful=harmful))
    return "".join(parts)


STAGE_EXTRAS = {"profiles": _profiles, "render": _render, "label": _label, "train": _train, "eval": _eval}
SKIP_STATS = ("screen", "warnings")


def _stage_sections(page: Page) -> None:
    from sage_builder.stages import STAGE_ORDER

    for name in STAGE_ORDER:
        stage = page.run.stage(name)
        manifest = stage.read_manifest()
        if manifest is None:
            page.sections.append((f"stage-{name}", name, '<p class="muted">not run</p>'))
            continue
        body = [stats_table(public_data(manifest.stats, page.run.root), SKIP_STATS)]
        extra = STAGE_EXTRAS.get(name)
        if extra is not None:
            body.append(extra(page))
        if name == "prompts":
            body.append(_rejects(page))
        page.sections.append((f"stage-{name}", name, "".join(body)))


def _lineage(page: Page) -> str:
    from sage_builder.stages import STAGE_ORDER

    rows = []
    for name in STAGE_ORDER:
        manifest = page.run.stage(name).read_manifest()
        if manifest is None:
            continue
        inputs = ", ".join(f"{k} {v[:12]}" for k, v in sorted(manifest.inputs.items())) or "none"
        models = "; ".join(f"{k}: {public_text(str(v.get('id') or v.get('model') or v), page.run.root)}"
                           for k, v in sorted(manifest.models.items())) or ""
        rows.append([name, Raw(f"<code>{esc(manifest.content_hash()[:16])}</code>"),
                     Raw(f"<code>{esc(manifest.fingerprint[:16])}</code>"), inputs, models,
                     _fmt(manifest.seconds) if manifest.seconds is not None else ""])
    total = sum((page.run.stage(n).read_manifest() or _NoManifest()).seconds or 0 for n in STAGE_ORDER)
    return (table(["stage", "manifest hash", "fingerprint", "inputs (manifest hashes)", "models", "seconds"], rows)
            + f"<p>Total stage time: {total:.1f} s.</p>")


class _NoManifest:
    seconds = None


def build_report(run_dir: Path | str, unblur: bool = False, out: Path | None = None) -> Path:
    """Write ``RUN/report.html`` (and its charts as ``RUN/report/*.png``); returns the page's path."""
    from sage_builder.store import atomic_write_bytes, atomic_write_text

    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise SageError(f"{run_dir}: no such run directory (run the pipeline first: `sage run --run-dir {run_dir}`)")
    if not any(run.stage(n).read_manifest() for n in ("profiles", "prompts", "render", "label", "train")):
        raise SageError(f"{run_dir}: no stage has finished there yet; run one first (`sage run --run-dir {run_dir}`)")
    page = Page(run, unblur)
    states = _stage_states(page)
    _stage_sections(page)
    lineage = _lineage(page)
    name = run.root.resolve().name
    warnings = ("".join(f'<div class="warning"><b>{esc(stage)}</b>: {esc(line)}</div>' for stage, line in page.warnings)
                or '<div class="ok">No data-quality warning.</div>')
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title in
                  [("stages", "stages"), ("warnings", "warnings"), *[(s, t) for s, t, _ in page.sections],
                   ("lineage", "lineage")])
    blur_note = ("Images of generated content are shown unblurred (--unblur)." if unblur else
                 "Images of generated content are blurred; `sage report --unblur` shows them.")
    sections = "".join(f'<section id="{sid}"><h2>Stage: {esc(title)}</h2>{content}</section>'
                       for sid, title, content in page.sections)
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sage run report: {esc(name)}</title><style>{CSS}</style></head>
<body><header><h1>Sage run report: {esc(name)}</h1>
<p>Written by <code>sage report</code> from the files of the run directory.</p></header>
<nav>{nav}</nav><main>
<p class="cw"><b>Content warning.</b> Sage is a dataset of harmful prompts and images by design. {esc(blur_note)}</p>
<section id="stages"><h2>Stages</h2>{table(["#", "stage", "state", "time", "finished (UTC)", "rows"], states)}</section>
<section id="warnings"><h2>Data-quality warnings</h2>{warnings}</section>
{sections}
<section id="lineage"><h2>Lineage and timings</h2>{lineage}</section>
</main></body></html>
"""
    target = Path(out) if out else run.root / REPORT_NAME
    atomic_write_text(target, document)
    for asset, data in page.assets.items():
        atomic_write_bytes(run.root / ASSETS / asset, data)
    return target
