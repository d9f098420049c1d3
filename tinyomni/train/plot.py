"""The training curves as a PNG, drawn with Pillow (no plotting library needed).

One panel per stage (their losses live on different scales: a contrastive loss is not a token
cross-entropy), loss against the global step, with the eval average as dots when there is one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

LOSS_COLOR, EVAL_COLOR = (66, 133, 244), (234, 67, 53)


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "training") -> Path:
    from tinyomni.world.render import png_bytes, ui_font  # the world owns font lookup

    stages = list(dict.fromkeys(r["stage"] for r in rows if r.get("type") == "train"))
    panel_w, panel_h, pad = 420, 220, 50
    width, height = max(1, len(stages)) * (panel_w + pad) + pad, panel_h + 2 * pad + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, bold = ui_font(11), ui_font(14, bold=True)
    draw.text((pad, 8), title, fill="black", font=bold)
    for k, stage in enumerate(stages):
        x0, y0 = pad + k * (panel_w + pad), pad + 10
        train = [(r["global_step"], r["loss"]) for r in rows if r.get("type") == "train" and r["stage"] == stage
                 and r.get("loss") is not None and math.isfinite(r["loss"])]
        evals = [(r["global_step"], r["average"]) for r in rows if r.get("type") == "eval" and r["stage"] == stage]
        draw.rectangle([x0, y0, x0 + panel_w, y0 + panel_h], outline=(180, 180, 180))
        draw.text((x0, y0 - 16), f"{stage}: loss" + ("  (red: eval average / 100)" if evals else ""),
                  fill="black", font=font)
        if not train:
            continue
        xs = [s for s, _ in train] + [s for s, _ in evals]
        lo_x, hi_x = min(xs), max(max(xs), min(xs) + 1)
        losses = [v for _, v in train]
        lo_y, hi_y = min(losses + [0.0]), max(losses) * 1.05 or 1.0

        box = (x0, y0, panel_w, panel_h, lo_x, hi_x)

        def to_px(s: float, v: float, lo: float = lo_y, hi: float = hi_y, box=box) -> tuple[float, float]:
            bx, by, bw, bh, sx0, sx1 = box
            return bx + (s - sx0) / (sx1 - sx0) * bw, by + bh - (v - lo) / max(hi - lo, 1e-9) * bh

        points = [to_px(s, v) for s, v in train]
        if len(points) > 1:
            draw.line(points, fill=LOSS_COLOR, width=2)
        else:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=LOSS_COLOR)
        for s, v in evals:  # eval average on a 0..100 scale
            px, py = to_px(s, v, 0.0, 100.0)
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=EVAL_COLOR)
        for v in (lo_y, (lo_y + hi_y) / 2, hi_y):
            draw.text((x0 - 40, to_px(lo_x, v)[1] - 6), f"{v:.3g}", fill=(90, 90, 90), font=font)
        draw.text((x0, y0 + panel_h + 4), f"step {lo_x}", fill=(90, 90, 90), font=font)
        draw.text((x0 + panel_w - 60, y0 + panel_h + 4), f"step {hi_x}", fill=(90, 90, 90), font=font)
    path = Path(path)
    path.write_bytes(png_bytes(image))
    return path
