"""Merge the committed ETTh1 runs and add rollout_select rows (run in benchmarks/)."""

import sys

import forecast_ett as fe
import pandas as pd

base = pd.read_csv("results/paths/forecast_ett_runs.csv")
exact = pd.read_csv("results/paths/exact/forecast_ett_runs.csv")
new = pd.read_csv("results/paths/exmix/forecast_ett_runs.csv")
frames = [
    base,
    exact[exact.model == "rollout_exact"],
    new[new.model.isin(["rollout_trcal", "rollout_exmix"])],
]
runs = pd.concat(frames, ignore_index=True).to_dict("records")
for h, s in sorted({(r["horizon"], r["seed"]) for r in runs}):
    task = [r for r in runs if (r["horizon"], r["seed"]) == (h, s)]
    runs.append(fe.selected_row("rollout_select", task))
order = list(fe.MODELS)
runs.sort(key=lambda r: (-r["horizon"], r["seed"], order.index(r["model"])))
note = "ETTh1: the committed runs of paths/, paths/exact/ and paths/exmix/ merged, with rollout_select"
fe.write_outputs(runs, sys.argv[1], note=note, published=fe.PUBLISHED["ETTh1"])
for r in runs:
    if r["model"] == "rollout_select":
        print(r["horizon"], r["seed"], r["chosen"], r["choice_scores"])
