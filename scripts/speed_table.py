"""README's GPU speed rows from what a device run brought back.

    python scripts/speed_table.py speed.json [timing.json]

speed.json: scripts/benchmark.py --json records (device_train.sh MODE=grid); timing.json:
device_train.py's, whose probe holds the training step's figures. Prints a markdown table, one
row per model and input: at batch 1 the median ms per call, at larger batches images/s, each as
fp32 / bf16 ("–" where not measured, "error" where the configuration failed), then a line per
training step measured. Nothing is rounded beyond 3 significant figures.
"""

from __future__ import annotations

import json
import pathlib
import sys

DTYPES = ("float32", "bfloat16")


def _input(h: int, w: int) -> str:
    return f"{h}²" if h == w else f"{h}×{w}"


def _cell(records: dict, key: tuple, batch: int) -> str:
    cells = []
    for dtype in DTYPES:
        r = records.get((*key, batch, dtype))
        if r is None:
            cells.append("–")
        elif "error" in r:
            cells.append("error")
        else:
            cells.append(f"{r['median_ms']:.3g}" if batch == 1 else f"{r['images_per_s']:.3g}")
    return " / ".join(cells)


def render(records: list[dict], timing: dict | None = None) -> str:
    forward = [r for r in records if r.get("kind", "forward") == "forward" and "height" in r]
    steps = [r for r in records if r.get("kind") == "train_step"]
    device = next((r["device"] for r in records if r.get("device")), None)
    if timing:
        device = device or timing.get("device")
        probe = timing.get("probe", {})
        known = {r["dtype"] for r in steps}
        crop, batch = timing.get("crop"), timing.get("batch")
        for dtype, p in probe.items():
            if dtype not in known and "step_s" in p:
                steps.append(
                    {
                        "dtype": dtype,
                        "height": crop,
                        "width": crop,
                        "batch": batch,
                        "compile_s": p["compile_s"],
                        "steps_per_s": p["steps_per_s"],
                        "images_per_s": p["images_per_s"],
                    }
                )
    by_key = {(r["model"], r["height"], r["width"], r["batch"], r["dtype"]): r for r in forward}
    rows = sorted({(r["model"], r["height"], r["width"]) for r in forward},
                  key=lambda k: (k[0] != "student", k[1] * k[2]))  # fmt: skip
    batches = sorted({r["batch"] for r in forward})
    head = [f"batch {b}, {'ms' if b == 1 else 'images/s'}: fp32 / bf16" for b in batches]
    lines = [
        f"On {device or 'the device'}:",
        "",
        "| model | input | " + " | ".join(head) + " |",
        "|---|---|" + "---|" * len(batches),
    ]
    for model, h, w in rows:
        cells = [_cell(by_key, (model, h, w), b) for b in batches]
        lines.append(f"| {model} | {_input(h, w)} | " + " | ".join(cells) + " |")
    if steps:
        lines.append("")
    for s in sorted(steps, key=lambda s: DTYPES.index(s["dtype"])):
        lines.append(
            f"- training step, student, batch {s['batch']} of {_input(s['height'], s['width'])}, "
            f"{s['dtype']}: {s['steps_per_s']:.3g} steps/s ({s['images_per_s']:.3g} crops/s; "
            f"compile {s['compile_s']:.0f} s)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python scripts/speed_table.py speed.json [timing.json]", file=sys.stderr)
        return 2
    try:
        records = json.loads(pathlib.Path(args[0]).read_text())
        timing = json.loads(pathlib.Path(args[1]).read_text()) if len(args) == 2 else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(records, timing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
