"""Reports: a markdown table per run, a side-by-side table of several runs, and a bar chart PNG.

All scores are 0-100 with higher better (WER/CER appear as 100 - error rate, with the rate beside).
The chart is drawn with Pillow, so reports need no plotting library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from tinyomni.errors import InputError


def _details(t: dict[str, Any]) -> str:
    metric = t["metric"]
    if metric == "pope":
        return (f"P {t['precision']:.1f} · R {t['recall']:.1f} · F1 {t['f1']:.1f} · "
                f"yes {t['yes_ratio']:.1f}%")
    if metric == "mme":
        return f"perception {t['perception']:.1f} · cognition {t['cognition']:.1f}"
    if metric in ("wer", "cer"):
        return f"{metric.upper()} {t[metric]:.1f}%"
    if "single_pass" in t:
        return f"circular over {t['n_questions']} questions · single pass {t['single_pass']:.1f}"
    return ""


def summary_markdown(summary: dict[str, Any]) -> str:
    """A markdown table of one run's summary.json."""
    lines = [f"## {summary.get('model', 'model')}", "",
             "| task | metric | n | score | chance | details |", "|---|---|---:|---:|---:|---|"]
    for name, t in summary["tasks"].items():
        chance = f"{t['chance']:.1f}" if t.get("chance") is not None else ""
        lines.append(f"| {name} | {t['metric']} | {t['n']} | {t['score']:.1f} | {chance} | {_details(t)} |")
    lines.append(f"| **average** | | {summary.get('n', '')} | **{summary['average']:.1f}** | | |")
    if summary.get("errors"):
        lines.append(f"\n{summary['errors']} item(s) failed; see `error` in predictions.jsonl.")
    return "\n".join(lines) + "\n"


def load_summaries(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """summary.json files, or run folders holding one."""
    summaries = []
    for p in paths:
        p = Path(p)
        p = p / "summary.json" if p.is_dir() else p
        if not p.is_file():
            raise InputError(f"no summary.json at {p}")
        summaries.append(json.loads(p.read_text()))
    return summaries


def compare_markdown(summaries: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """One row per task, one column per run."""
    names = list(names or [s.get("model", f"run{i}") for i, s in enumerate(summaries)])
    tasks = list(dict.fromkeys(t for s in summaries for t in s["tasks"]))
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task in tasks:
        cells = [f"{s['tasks'][task]['score']:.1f}" if task in s["tasks"] else "–" for s in summaries]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(f"**{s['average']:.1f}**" for s in summaries) + " |")
    return "\n".join(lines) + "\n"


PALETTE = [(66, 133, 244), (234, 67, 53), (251, 188, 5), (52, 168, 83), (154, 80, 200), (255, 112, 67),
           (0, 172, 193), (120, 120, 120)]


def compare_chart(summaries: Sequence[dict[str, Any]], path: str | Path, names: Sequence[str] | None = None,
                  title: str = "tinyomni eval") -> Path:
    """A horizontal grouped bar chart (one group per task, one bar per run) written as PNG."""
    from tinyomni.world.render import png_bytes, text_size, ui_font  # the world owns font lookup

    names = list(names or [s.get("model", f"run{i}") for i, s in enumerate(summaries)])
    tasks = list(dict.fromkeys(t for s in summaries for t in s["tasks"])) + ["average"]
    bar_h, gap = 14, 10
    label_w, plot_w, top = 190, 420, 56
    group_h = bar_h * len(summaries) + gap
    width, height = label_w + plot_w + 60, top + group_h * len(tasks) + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, bold = ui_font(12), ui_font(14, bold=True)
    draw.text((10, 8), title, fill="black", font=bold)
    x = 10
    for i, name in enumerate(names):  # legend
        draw.rectangle([x, 32, x + 12, 44], fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 16, 31), name, fill="black", font=font)
        x += 16 + text_size(font, name)[0] + 18
    for v in (0, 25, 50, 75, 100):  # axis ticks, under the bars
        x = label_w + plot_w * v / 100
        draw.line([(x, top - 4), (x, height - 26)], fill=(225, 225, 225))
        draw.text((x - 6, height - 22), str(v), fill=(90, 90, 90), font=ui_font(10))
    for g, task in enumerate(tasks):
        y0 = top + g * group_h
        label_font = bold if task == "average" else font
        tw, th = text_size(label_font, task)
        draw.text((label_w - 8 - tw, y0 + (group_h - gap) / 2 - th / 2 - 2), task, fill="black",
                  font=label_font)
        for i, s in enumerate(summaries):
            score = s["average"] if task == "average" else s["tasks"].get(task, {}).get("score")
            if score is None:
                continue
            y = y0 + i * bar_h
            draw.rectangle([label_w, y, label_w + plot_w * score / 100, y + bar_h - 2],
                           fill=PALETTE[i % len(PALETTE)])
            draw.text((label_w + plot_w * score / 100 + 4, y), f"{score:.1f}", fill="black", font=ui_font(10))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image))
    return path
