#!/usr/bin/env python3
"""Plot DM send→deliver latency against offered rate, Switchboard and baseline, from `switchboard-load dm
--with-baseline --json` reports (one file per rate). Standard library only; writes an SVG.

    python3 benches/load/plot_dm_latency.py docs/img/dm-latency.svg dm2000.json dm5000.json ...
"""

import json
import math
import sys

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 180, 40, 60
SERIES = [
    # (target, metric key, label, colour, dashed)
    ("switchboard", "deliver_p50_us", "Switchboard p50", "#1f77b4", False),
    ("switchboard", "deliver_p99_us", "Switchboard p99", "#d62728", False),
    ("switchboard", "deliver_p999_us", "Switchboard p99.9", "#9467bd", False),
    ("baseline", "deliver_p50_us", "baseline p50", "#1f77b4", True),
    ("baseline", "deliver_p99_us", "baseline p99", "#d62728", True),
]


def load(paths):
    """{(target, key): [(rate, value_ms)]} from the reports."""
    points = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for run in report["runs"]:
            rate = float(run["params"]["rate"])
            metrics = {m["key"]: m["value"] for m in run["metrics"]}
            for target, key, *_ in SERIES:
                if run["target"] == target and key in metrics:
                    points.setdefault((target, key), []).append((rate, metrics[key] / 1000.0))
    for series in points.values():
        series.sort()
    return points


def svg(points):
    rates = sorted({r for s in points.values() for r, _ in s})
    values = [v for s in points.values() for _, v in s if v > 0]
    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    x0, x1 = 0.0, max(rates) * 1.05
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(rate):
        return LEFT + (rate - x0) / (x1 - x0) * plot_w

    def y(ms):
        return TOP + plot_h - (math.log10(ms) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="14">DM send→deliver latency vs offered rate '
        "(1,000 pairs, durable acks, 2 cores)</text>",
    ]
    decade = lo
    while decade <= hi:
        for mult in (1, 2, 5):
            v = decade * mult
            if lo <= v <= hi:
                out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
                           'stroke="#ddd"/>')
                out.append(f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g} ms</text>')
        decade *= 10
    for r in rates:
        out.append(f'<line x1="{x(r):.1f}" x2="{x(r):.1f}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{x(r):.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{r:,.0f}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 18}" text-anchor="middle">offered rate (msg/s)</text>')
    target = y(5.0)
    out.append(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{target:.1f}" y2="{target:.1f}" '
               'stroke="#2ca02c" stroke-width="2" stroke-dasharray="2,3"/>')
    out.append(f'<text x="{LEFT + plot_w + 8}" y="{target + 4:.1f}" fill="#2ca02c">target p99 5 ms</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>')
    legend_y = TOP + 30
    for target_name, key, label, colour, dashed in SERIES:
        series = points.get((target_name, key))
        if not series:
            continue
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        path = " ".join(f"{x(r):.1f},{y(max(v, lo)):.1f}" for r, v in series)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for r, v in series:
            out.append(f'<circle cx="{x(r):.1f}" cy="{y(max(v, lo)):.1f}" r="3" fill="{colour}"/>')
        out.append(f'<line x1="{LEFT + plot_w + 8}" x2="{LEFT + plot_w + 30}" y1="{legend_y}" y2="{legend_y}" '
                   f'stroke="{colour}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{LEFT + plot_w + 36}" y="{legend_y + 4}">{label}</text>')
        legend_y += 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    points = load(sys.argv[2:])
    if not points:
        sys.exit("no dm runs in the reports")
    with open(sys.argv[1], "w") as f:
        f.write(svg(points))


if __name__ == "__main__":
    main()
