"""Before/after check of a refactor: the demo, predict, serve and the ONNX runner give the same
numbers on two checkouts.

`run CHECKOUT OUT.json` trains the offline demo in CHECKOUT (`python -m met_lightning`), then on
the run's digits test images written as PNG files: `met_lightning.predict` (budget 0.5, CSV rows),
`met_lightning.serve` (one multipart request per file) and `met_lightning.export` + the ONNX
Runtime runner (budget 0.5), all run from CHECKOUT's code; it writes what each printed or answered.
`compare A.json B.json` prints the before/after table and exits 1 if any number differs.

    python -m experiments.same_numbers run /tmp/before before.json
    python -m experiments.same_numbers run . after.json
    python -m experiments.same_numbers compare before.json after.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from experiments.bench_serve import digit_pngs, free_port, wait_healthy

IMAGES = 40
# the demo's printed tables: lines of a Rich / markdown table with a number in them
TABLE_LINE = re.compile(r"^[│|┃].*\d")

ORT_ROWS = """
import json, sys
import numpy as np
from PIL import Image
from met_lightning.export.ort_runner import OrtEarlyExit
runner = OrtEarlyExit(sys.argv[1], budget=0.5)
files = sorted(__import__("pathlib").Path(sys.argv[2]).glob("*.png"))
images = np.stack([runner.transform(Image.open(f)) for f in files]).astype(np.float32)
result = runner(images)
print(json.dumps([[f.name, int(c), int(e), round(float(g), 4)] for f, c, e, g in zip(
    files, result.predictions, result.exit_index, result.logits.max(-1))]))
"""


def python(checkout: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.run(
        [sys.executable, *args], cwd=checkout, env=env, text=True, capture_output=True,
        check=True, **kwargs,
    )  # fmt: skip


def run(checkout: Path, out: Path) -> None:
    checkout = checkout.resolve()
    work = Path(tempfile.mkdtemp(prefix="same_numbers_"))
    demo = python(checkout, "-m", "met_lightning", f"paths.log_dir={work}/logs", "logger=csv")
    run_dir = Path(next((work / "logs").glob("*/runs/*/summary.json")).parent)
    summary = json.loads((run_dir / "summary.json").read_text())
    images = work / "images"
    images.mkdir()
    for i, png in enumerate(digit_pngs(run_dir, IMAGES)):
        (images / f"{i:03d}.png").write_bytes(png)

    python(checkout, "-m", "met_lightning.predict", f"checkpoint={run_dir}", f"input={images}",
           "budget=0.5", f"output={work}/preds.csv")  # fmt: skip
    with open(work / "preds.csv") as f:
        predicted = [{**row, "file": Path(row["file"]).name} for row in csv.DictReader(f)]

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    server = subprocess.Popen(
        [sys.executable, "-m", "met_lightning.serve", f"checkpoint={run_dir}", "budget=0.5",
         f"port={port}", "host=127.0.0.1"],
        cwd=checkout, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_healthy(server, f"http://127.0.0.1:{port}", 120)
        served = []
        for f in sorted(images.glob("*.png")):
            upload = {"file": (f.name, f.read_bytes())}
            url = f"http://127.0.0.1:{port}/predict"
            answer = httpx.post(url, files=upload, timeout=30).json()
            answer.pop("batch_size", None)
            served.append({"file": f.name, **answer})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)

    python(checkout, "-m", "met_lightning.export", f"checkpoint={run_dir}", "format=onnx",
           f"out={work}/onnx")  # fmt: skip
    ort = json.loads(python(checkout, "-c", ORT_ROWS, f"{work}/onnx", str(images)).stdout)

    tables = [line.rstrip() for line in demo.stdout.splitlines() if TABLE_LINE.match(line)]
    record = {"checkout": str(checkout), "commit": git_commit(checkout), "demo_tables": tables,
              "summary": {k: summary[k] for k in sorted(summary) if k not in NOISY},
              "predict": predicted, "served": served, "onnx": ort}  # fmt: skip
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} ({len(predicted)} predicted, {len(served)} served, {len(ort)} onnx rows)")


# summary.json fields that hold times, paths or dates, not numbers of the model
NOISY = {"run_dir", "output_dir", "time", "duration_s", "fit_time_s", "test_time_s", "date",
         "versions", "started", "finished", "wall_time_s", "timings"}  # fmt: skip
TIMES = re.compile(r"\d+(\.\d+)?\s*(s|ms|it/s|img/s|images/s)\b")


def git_commit(checkout: Path) -> str:
    return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    print(f"| output | before ({a['commit']}) | after ({b['commit']}) | same |")
    print("|---|---|---|---|")
    differs = 0
    for key in ("demo_tables", "summary", "predict", "served", "onnx"):
        x, y = a[key], b[key]
        if key == "demo_tables":  # timing columns may differ; the numbers of the model may not
            x, y = [TIMES.sub("T", s) for s in x], [TIMES.sub("T", s) for s in y]
        same = x == y
        differs += not same
        size = f"{len(x)} rows" if isinstance(x, list) else f"{len(x)} fields"
        print(f"| {key} | {size} | {len(y) if isinstance(y, list) else len(y)} | "
              f"{'yes' if same else 'NO'} |")  # fmt: skip
        if not same and isinstance(x, list):
            for i, (u, v) in enumerate(zip(x, y, strict=False)):
                if u != v:
                    print(f"    first difference, row {i}:\n      {u}\n      {v}")
                    break
        elif not same:
            fields = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            print(f"    fields that differ: {fields}")
    return 1 if differs else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("checkout", type=Path)
    r.add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.checkout, args.out)
    else:
        sys.exit(compare(args.before, args.after))


if __name__ == "__main__":
    main()
