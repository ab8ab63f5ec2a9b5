"""The audit's static HTML report: why the run decided as it did, per-category counts, the
trend over the last nights (inline SVG, no JavaScript), a score histogram and the top images,
linked not embedded."""
from __future__ import annotations

import html
import os
from urllib.parse import quote

import numpy as np

from stfpm.storage import filesystem_for, is_s3


def s3_client():
    """A boto3 S3 client: endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), region and
    credentials from the standard AWS environment and chain; presigned URLs are SigV4 (so
    they need the buckets' region: s3.region in the config, or AWS_REGION)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(signature_version="s3v4"))



class Links:
    """How the report refers to a file: a relative path when both are local, a presigned
    https URL (valid `expiry_s`) for an s3:// file, file:// for a local file seen from S3."""

    def __init__(self, report_uri: str, expiry_s: float):
        self.local_dir = None if is_s3(report_uri) else os.path.dirname(filesystem_for(report_uri)[1])
        self.expiry_s = int(expiry_s)
        self._client = None

    def __call__(self, uri: str | None) -> str | None:
        if not uri:
            return None
        if is_s3(uri):
            if self._client is None:
                self._client = s3_client()
            bucket, _, key = uri[len("s3://"):].partition("/")
            return self._client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                       ExpiresIn=self.expiry_s)
        path = filesystem_for(uri)[1]
        if self.local_dir is None:
            return "file://" + quote(path)
        return quote(os.path.relpath(path, self.local_dir).replace(os.sep, "/"))


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left}.meta{color:#666}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;color:#fff;font-weight:600}
.ok{background:#2e7d32}.alert{background:#c62828}.errors{background:#e65100}.alert-reason{color:#c62828}
.grid{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0;width:500px}
figure img{width:240px;height:240px;object-fit:contain;background:#f4f4f4;border:1px solid #ddd}
figcaption{font-size:13px;word-break:break-all}code{font-size:12px}
.why li{margin:2px 0}.why .alert-reason{font-weight:600}.why .muted{color:#666}
.trend td{padding:2px 8px;vertical-align:middle}.trend svg{display:block}
"""


def histogram_svg(counts: list[int], edges: list[float], width: int = 420, height: int = 140) -> str:
    """Bars over the normalised score 0..1, heights on a log scale (anomalies are rare),
    with the threshold (0.5) marked; each bar's exact count is in its tooltip."""
    pad_l, pad_b, pad_t = 30, 20, 6
    plot_w, plot_h = width - pad_l - 6, height - pad_b - pad_t
    top = np.log1p(max(counts, default=0)) or 1.0
    bar_w = plot_w / len(counts)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="score histogram">']
    for i, c in enumerate(counts):
        h = plot_h * np.log1p(c) / top
        x, y = pad_l + i * bar_w, pad_t + plot_h - h
        colour = "#c62828" if edges[i] >= 0.5 else "#5c8fd6"
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" fill="{colour}">'
                     f'<title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {c}</title></rect>')
    x_thr = pad_l + 0.5 * plot_w
    parts.append(f'<line x1="{x_thr:.1f}" y1="{pad_t}" x2="{x_thr:.1f}" y2="{pad_t + plot_h}" '
                 'stroke="#000" stroke-dasharray="4 3"/>')
    base = pad_t + plot_h
    parts.append(f'<line x1="{pad_l}" y1="{base}" x2="{pad_l + plot_w}" y2="{base}" stroke="#888"/>')
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{pad_l + v * plot_w:.1f}" y="{height - 5}" font-size="10" '
                     f'text-anchor="middle">{v:g}</text>')
    parts.append(f'<text x="{pad_l - 4}" y="{pad_t + 9}" font-size="10" text-anchor="end">'
                 f'{max(counts, default=0)}</text></svg>')
    return "".join(parts)


def sparkline_svg(values: list, labels: list[str], rate: bool, width: int = 170, height: int = 46) -> str:
    """A small line chart of one series over the nights (oldest left), gaps where a night has
    no value; the last value and the maximum written beside it, each point's exact value in
    its tooltip. Rates are drawn on 0..max(rate, 1%) and written as percentages."""
    pad_l, pad_r, pad_t, pad_b = 4, 52, 6, 6
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b
    known = [v for v in values if v is not None]
    top = max(known, default=0.0)
    top = max(top, 0.01) if rate else max(top, 1)
    show = (lambda v: f"{v:.1%}") if rate else (lambda v: f"{v:g}")
    step = plot_w / max(len(values) - 1, 1)
    at = [None if v is None else (pad_l + i * step if len(values) > 1 else pad_l + plot_w / 2,
                                  pad_t + plot_h * (1 - v / top), v, label)
          for i, (v, label) in enumerate(zip(values, labels))]
    points = [p for p in at if p is not None]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="trend">', f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" '
             f'y2="{pad_t + plot_h}" stroke="#ccc"/>']
    runs: list[list] = [[]]
    for p in at:  # a night without a value breaks the line
        runs.append([]) if p is None else runs[-1].append(p)
    for run in (r for r in runs if len(r) > 1):
        parts.append('<polyline fill="none" stroke="#5c8fd6" stroke-width="1.5" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in run) + '"/>')
    for x, y, v, label in points:
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="#1f4e99"><title>{html.escape(label)}: '
                     f'{show(v)}</title></circle>')
    last = known[-1] if values and values[-1] is not None else None
    parts.append(f'<text x="{width - pad_r + 4}" y="{pad_t + 10}" font-size="11">'
                 f'{"-" if last is None else show(last)}</text>'
                 f'<text x="{width - pad_r + 4}" y="{height - 4}" font-size="9" fill="#777">max {show(top) if known else "-"}'
                 '</text></svg>')
    return "".join(parts)


def trend_html(trend: dict | None) -> list[str]:
    """The trend section: one row per category, one sparkline per series (stfpm.audit.trend)."""
    if not trend or not trend.get("categories"):
        return []
    e = html.escape
    nights = trend["nights"]
    out = [f"<h2 id='trend'>Trend: the last {len(nights)} night(s)</h2><p class='meta'>Oldest left, this run "
           f"right; from {e(str(nights[0]['until']))} to {e(str(nights[-1]['until']))}. Hover a point for its "
           "night and value.</p><table class='trend'><tr><th>category</th><th>inputs</th><th>anomaly rate</th>"
           "<th>ood rate</th><th>error rate</th></tr>"]
    for name, points in trend["categories"].items():
        labels = [f"{p['run_id']} (until {p['until']})" for p in points]
        cells = [sparkline_svg([p[key] for p in points], labels, rate=key != "inputs")
                 for key in ("inputs", "anomaly_rate", "ood_rate", "error_rate")]
        out.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return out


def why_html(summary: dict) -> list[str]:
    """The run's reasons (summary "why"): its exit code, the window, what waits in the settle window."""
    why = summary.get("why")
    if not why:
        return []
    return ["<ul class='why'>"] + [f"<li>{html.escape(w)}</li>" for w in why] + ["</ul>"]


def category_why_html(c: dict) -> list[str]:
    """A category's reasons, one per check; alerts in red."""
    why = c.get("why")
    if not why:
        return []
    style = {"alert": "alert-reason", "ok": "", "not checked": "muted"}
    return (["<ul class='why'>"] + [f"<li class='{style.get(w['outcome'], '')}'><b>{html.escape(w['outcome'])}:</b> "
                                    f"{html.escape(w['text'])}</li>" for w in why] + ["</ul>"])


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def render_report(summary: dict, report_uri: str, link_expiry_hours: float = 168) -> str:
    """The static HTML report for an audit summary; images are linked, not embedded."""
    link = Links(report_uri, link_expiry_hours * 3600)
    e = html.escape
    t = summary["totals"]
    status = summary["status"]
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>Audit {e(summary['run_id'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Nightly audit {e(summary['run_id'])} <span class='badge {e(status)}'>{e(status.upper())}</span></h1>",
           f"<p class='meta'>Input <code>{e(summary['input'])}</code>, arrived in "
           f"({e(summary['window']['since'] or 'the beginning')}, {e(summary['window']['until'])}]; "
           f"models <code>{e(summary['models'])}</code>; attempt {summary['attempts']}; "
           f"generated {e(summary['generated_at'])}.</p>",
           *why_html(summary),
           "<table><tr><th>category</th><th>inputs</th><th>ok</th><th>errors</th><th>anomalous</th>"
           "<th>anomaly rate</th><th>alert level</th><th title='unlike the training images'>ood</th><th></th></tr>"]
    for name, c in summary["categories"].items():
        badge = (f"<span class='badge alert' title='{e('; '.join(c['alert_reasons']))}'>ALERT</span>"
                 if c["alert"] else "".join(f"<span class='meta' title='{e(w['text'])}'>too few images</span>"
                                            for w in c.get("why", []) if w["check"] == "min_images"))
        out.append(f"<tr><td><a href='#cat-{e(name)}'>{e(name)}</a></td><td>{c['inputs']}</td><td>{c['ok']}</td>"
                   f"<td>{c['error']}</td><td>{c['anomalous']}</td><td>{_fmt(c['anomaly_rate'], '.2%')}</td>"
                   f"<td>{c['alert_level']:.2%}</td><td>{c['ood']}</td><td>{badge}</td></tr>")
    out.append(f"<tr><th>all</th><th>{t['inputs']}</th><th>{t['ok']}</th><th>{t['error']}</th>"
               f"<th>{t['anomalous']}</th><th>{_fmt(t['anomaly_rate'], '.2%')}</th><th></th><th>{t['ood']}</th>"
               "<th></th></tr></table>")
    if not summary["categories"]:
        out.append("<p>No images arrived in this window.</p>")
    out += trend_html(summary.get("trend"))
    if t.get("error"):
        out.append(f"<p class='meta'>Errors: {t.get('error_input', 0)} bad input files (not retried), "
                   f"{t.get('error_transient', 0)} transient (model or storage; retried by the next run). "
                   f"{t.get('retried', 0)} inputs were retried from the last run.</p>")
    for name, c in summary["categories"].items():
        models = ", ".join(f"{m['name']} ({m['model_version'][:12]}, threshold {m['threshold']:.4g})"
                           for m in c["models"])
        out.append(f"<h2 id='cat-{e(name)}'>{e(name)}</h2><p class='meta'>{c['ok']} scored, "
                   f"{c['anomalous']} anomalous ({_fmt(c['anomaly_rate'], '.2%')}; alert above "
                   f"{c['alert_level']:.2%}), {c['error']} errors. Model: {e(models) or '-'}.</p>")
        for reason in c["alert_reasons"]:
            out.append(f"<p class='alert-reason'><b>Alert:</b> {e(reason)}</p>")
        out += category_why_html(c)
        if c["ood"]:
            out.append(f"<h3>{c['ood']} unlike the training images (ood)</h3><p class='meta'>Their scores are not "
                       "to be trusted: check that the right model scored them and that the camera did not change."
                       "</p><table><tr><th>input</th><th>ood score (&gt; 1 = ood)</th></tr>")
            out += [f"<tr><td><code>{e(u)}</code></td><td>{s:.3g}</td></tr>" for u, s in c["ood_examples"]]
            out.append("</table>")
        out.append(histogram_svg(c["histogram"]["counts"], c["histogram"]["edges"]))
        out.append("<p class='meta'>Normalised score (0.5 = threshold, dashed); bar heights on a log scale.</p>")
        if c["top"]:
            out.append(f"<h3>Top {len(c['top'])} by score</h3><div class='grid'>")
            for r in c["top"]:
                picture = link(r["overlay_uri"] or r["image_uri"])
                source, heat = link(r["image_uri"]), link(r["map_uri"])
                caption = "overlay" if r["overlay_uri"] else "image"
                out.append(
                    f"<figure><a href='{e(source)}'><img src='{e(picture)}' alt='{caption} of "
                    f"{e(r['image_uri'])}'></a> <a href='{e(heat)}'><img src='{e(heat)}' alt='anomaly map of "
                    f"{e(r['image_uri'])}'></a><figcaption>score {r['score']:.3f} (raw {r['raw_score']:.4g})"
                    f"{' <b>anomalous</b>' if r['is_anomaly'] else ''}{' <b>ood</b>' if r.get('ood') else ''}"
                    f"<br><code>{e(r['image_uri'])}</code>"
                    f"</figcaption></figure>")
            out.append("</div>")
        if c["error"]:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(c["errors"]["by_kind"].items()))
            out.append(f"<h3>Errors ({e(kinds)})</h3><table><tr><th>input</th><th>error</th></tr>")
            out += [f"<tr><td><code>{e(u)}</code></td><td style='text-align:left'>{e(str(m))}</td></tr>"
                    for u, m in c["errors"]["examples"]]
            out.append("</table>")
    scoring = summary.get("scoring")
    if scoring:
        out.append(f"<h2>Scoring</h2><p class='meta'>{scoring['counts']['scored']} scored this attempt, "
                   f"{scoring['counts']['skipped_already_scored']} already scored by an earlier attempt; "
                   f"{_fmt(scoring['images_per_s'], '.1f')} images/s; devices {e(', '.join(scoring['devices']))}."
                   "</p>")
    out.append("</body></html>")
    return "\n".join(out)

