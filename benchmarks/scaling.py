r"""Scaling: time and peak memory of one training step against units H, time steps T and batch B.

Each sweep varies one size from the reference configuration of ``step_speed.py`` (input 64,
AR(1) prior over T steps, Gaussian likelihood, per-unit beta) and keeps the others: units
64 ... 4096 (B = 256, T = 8), time steps 1 ... 64 (B = 256, H = 128) and batch 32 ... 2048
(H = 128, T = 8). The network has **one** neuron layer: with two layers of H units the second
reads the first through an H x H weight, quadratic in H by construction, which would hide the
cost of the neurons themselves.

Timing repetitions are interleaved over the points of a sweep and reduced to medians (wall and
thread CPU time). Peak step memory is measured as in ``step_speed.py``: in a child process with
``MALLOC_MMAP_THRESHOLD_=65536``, the rise of the resident set's high-water mark during one step.

The log-log slope of each curve is fitted by least squares over all points and over the upper
half; linear cost means a slope of 1, and the target (<= 1.1) is judged on the upper half, which
estimates the asymptotic cost: over all points, fixed per-step costs flatten the time curves, and
blocks under 64 KiB (invisible to the memory probe) steepen the memory curves at the small end.
Writes
``scaling.csv``, ``scaling.png`` and ``scaling.md`` to ``--out-dir``.

**Allocator.** glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and unmaps it on free, so a step whose tensors exceed 32 MiB (units = 4096: B x H x T
floats = 32 MiB) pays a page fault per 4 KiB on every allocation, every step: time then grows
faster than the work. ``--allocator heap`` reruns the timing with ``MALLOC_MMAP_MAX_=0`` (all
blocks from the heap, reused without faults); ``system`` (default) leaves glibc as it is.

    python benchmarks/scaling.py                       # about 5 minutes on 2 cores
    python benchmarks/scaling.py --sweeps units --variant jit
    python benchmarks/scaling.py --tiny                # seconds; what the test runs
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from step_speed import StepConfig, make_step, peak_step_memory  # noqa: E402

from vdn_pyro.files import atomic_path, write_text  # noqa: E402

SWEEPS = {
    "units": ("units", (64, 128, 256, 512, 1024, 2048, 4096)),
    "time_steps": ("steps", (1, 2, 4, 8, 16, 32, 64)),
    "batch": ("batch", (32, 64, 128, 256, 512, 1024, 2048)),
}
TINY_SWEEPS = {
    "units": ("units", (4, 8, 16)),
    "time_steps": ("steps", (1, 2, 4)),
    "batch": ("batch", (4, 8, 16)),
}
BASE = StepConfig(batch=256, input=64, units=128, layers=1, steps=8)
TINY_BASE = StepConfig(batch=8, input=4, units=6, layers=1, steps=3, hidden=5, out=2)
TARGET_SLOPE = 1.1


def point_config(base, field, value):
    """The configuration of one point of a sweep."""
    return dataclasses.replace(base, **{field: value})


def time_sweep(base, field, values, reps, variant="eager", device="cpu", warmup=2):
    """Interleaved medians of wall and CPU milliseconds per step at each value."""
    steps = [make_step(variant, point_config(base, field, v), device) for v in values]
    for step in steps:
        for _ in range(warmup):
            step()
    wall = [[] for _ in values]
    cpu = [[] for _ in values]
    for _ in range(reps):
        for i, step in enumerate(steps):
            w0, c0 = time.perf_counter(), time.thread_time()
            step()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            cpu[i].append(time.thread_time() - c0)
            wall[i].append(time.perf_counter() - w0)
    return [1e3 * statistics.median(t) for t in wall], [1e3 * statistics.median(t) for t in cpu]


def memory_probe(base, sweeps, variant, device):
    """In the child process: peak step memory (bytes) of every point of every sweep."""
    pyro.enable_validation(False)
    out = {}
    for name, (field, values) in sweeps.items():
        out[name] = []
        for v in values:
            step = make_step(variant, point_config(base, field, v), device)
            out[name].append(peak_step_memory(step, device))
            del step
    return out


def measure_memory(base, sweeps, variant, device, threads):
    if torch.device(device).type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        return {name: [math.nan] * len(values) for name, (_, values) in sweeps.items()}
    payload = json.dumps(
        {"base": dataclasses.asdict(base), "sweeps": {k: [f, list(v)] for k, (f, v) in sweeps.items()}}
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-probe",
        payload,
        "--variant",
        variant,
        "--device",
        str(device),
        "--threads",
        str(threads),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def loglog_slope(xs, ys):
    """Least-squares slope of log y against log x (``nan`` with fewer than 2 usable points)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0 and math.isfinite(y)]
    if len(pairs) < 2:
        return math.nan
    lx, ly = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(lx, ly, 1)[0])


def slopes(rows):
    """Per sweep and quantity: slope over all points and over the upper half."""
    out = []
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        sub = [r for r in rows if r["sweep"] == sweep]
        xs = [r["value"] for r in sub]
        upper = slice(len(sub) // 2, None)
        for quantity in ("cpu_ms", "wall_ms", "peak_mib"):
            ys = [r[quantity] for r in sub]
            out.append(
                {
                    "sweep": sweep,
                    "quantity": quantity,
                    "slope_all": loglog_slope(xs, ys),
                    "slope_upper": loglog_slope(xs[upper], ys[upper]),
                }
            )
    return out


def plot(rows, fitted, path):
    """Log-log panels (one per sweep) of CPU time and peak memory, with fitted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = list(dict.fromkeys(r["sweep"] for r in rows))
    fig, axes = plt.subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 7), squeeze=False)
    for col, sweep in enumerate(sweeps):
        sub = [r for r in rows if r["sweep"] == sweep]
        xs = np.array([r["value"] for r in sub], dtype=float)
        panels = (("cpu_ms", "CPU ms / step"), ("peak_mib", "peak MiB / step"))
        for row, (quantity, label) in enumerate(panels):
            ax = axes[row][col]
            ys = np.array([r[quantity] for r in sub], dtype=float)
            ok = (ys > 0) & np.isfinite(ys)
            ax.loglog(xs[ok], ys[ok], "o-", label="measured")
            slope = next(
                f["slope_upper"] for f in fitted if f["sweep"] == sweep and f["quantity"] == quantity
            )
            if ok.sum() >= 2 and math.isfinite(slope):
                anchor_x, anchor_y = xs[ok][-1], ys[ok][-1]
                ax.loglog(xs[ok], anchor_y * (xs[ok] / anchor_x) ** slope, "--", label=f"slope {slope:.2f}")
                ax.loglog(xs[ok], anchor_y * (xs[ok] / anchor_x), ":", color="grey", label="linear")
            ax.set_xlabel(sweep)
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def format_report(results):
    lines = [
        (
            f"scaling ({results['variant']} step, one neuron layer, AR(1) over T, Gaussian, "
            f"{results['allocator']} allocator): "
            f"{results['cores']} CPU cores, torch threads={results['threads']}, "
            f"device={results['device']}, reps={results['reps']}"
        ),
        "",
        "| sweep | value | wall ms | CPU ms | peak MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['sweep']} | {r['value']} | {r['wall_ms']:.2f} | {r['cpu_ms']:.2f} | {r['peak_mib']:.2f} |"
        )
    lines += [
        "",
        "| sweep | quantity | slope (all) | slope (upper half) | target (upper half) | met |",
        "|---|---|---:|---:|---:|---|",
    ]
    for s in results["slopes"]:
        met = "yes" if s["slope_upper"] <= TARGET_SLOPE else "NO"
        lines.append(
            f"| {s['sweep']} | {s['quantity']} | {s['slope_all']:.2f} | {s['slope_upper']:.2f} | "
            f"<= {TARGET_SLOPE} | {met} |"
        )
    return "\n".join(lines)


HEAP_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**34)}


def main(args):
    """Run the sweeps as ``args`` (see :func:`parse_args`) asks; print the tables, write the CSV,
    PNG, Markdown and JSON files and return the results (``rows``, ``slopes``). Restores torch's
    thread count on return."""
    previous = torch.get_num_threads()
    try:
        return _main(args)
    finally:
        torch.set_num_threads(previous)


def _main(args):
    if args.allocator == "heap" and not args.memory_probe and os.environ.get("MALLOC_MMAP_MAX_") != "0":
        # glibc reads these once, at start-up: run this script again under them
        argv = sys.argv[1:] if args.argv is None else args.argv
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *argv],
            env=dict(os.environ, **HEAP_ENV),
            check=True,
            capture_output=True,
            text=True,
        )
        print(done.stdout, end="")
        return json.loads((Path(args.out_dir) / "scaling.json").read_text())
    torch.set_num_threads(args.threads)
    sweeps = TINY_SWEEPS if args.tiny else SWEEPS
    base = TINY_BASE if args.tiny else BASE
    if args.memory_probe:
        spec = json.loads(args.memory_probe)
        probe = {k: (f, tuple(v)) for k, (f, v) in spec["sweeps"].items()}
        print(json.dumps(memory_probe(StepConfig(**spec["base"]), probe, args.variant, args.device)))
        return None
    if args.sweeps != "all":
        sweeps = {k: v for k, v in sweeps.items() if k in args.sweeps.split(",")}
    reps = args.reps if args.reps is not None else (2 if args.tiny else 5)
    pyro.enable_validation(False)
    rows = []
    for name, (field, values) in sweeps.items():
        wall, cpu = time_sweep(base, field, values, reps, args.variant, args.device)
        for v, w, c in zip(values, wall, cpu):
            rows.append({"sweep": name, "value": v, "wall_ms": w, "cpu_ms": c})
    memory = measure_memory(base, sweeps, args.variant, args.device, args.threads)
    for name in sweeps:
        for row, peak in zip([r for r in rows if r["sweep"] == name], memory[name]):
            row["peak_mib"] = peak / 2**20
    pyro.enable_validation(True)
    results = {
        "variant": args.variant,
        "allocator": args.allocator,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(args.device),
        "reps": reps,
        "base": dataclasses.asdict(base),
        "rows": rows,
    }
    results["slopes"] = slopes(rows)
    report = format_report(results)
    print(report)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{r['sweep']},{r['value']},{r['wall_ms']:.4f},{r['cpu_ms']:.4f},{r['peak_mib']:.4f}\n" for r in rows
    ]
    write_text(out / "scaling.csv", "sweep,value,wall_ms,cpu_ms,peak_mib\n" + "".join(lines))
    write_text(out / "scaling.md", report + "\n")
    write_text(out / "scaling.json", json.dumps(results, indent=1))
    plot(rows, results["slopes"], out / "scaling.png")
    results["files"] = [str(out / n) for n in ("scaling.csv", "scaling.md", "scaling.png")]
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweeps", default="all", help="comma-separated subset of units,time_steps,batch")
    parser.add_argument("--variant", choices=("eager", "jit", "twin"), default="eager")
    parser.add_argument("--reps", type=int, default=None, help="timed steps per point (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--allocator", choices=("system", "heap"), default="system")
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    return args


if __name__ == "__main__":
    main(parse_args())
