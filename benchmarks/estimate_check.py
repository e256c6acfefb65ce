"""How close the planner's time estimate comes to a measured whole run (GPU).

Reads the whole_run.json that `benchmarks/whole_run.py` writes, takes the plan sftop chose for it,
and prints the estimate (`sftop.engine.planner.runtime`) next to what the run measured: seconds a
step, training time and time from start to end. The estimate is calibrated on one H200; a run on
another card (an H100, or one scaled by its tensor peak) shows how far it carries.

    python benchmarks/whole_run.py --out /tmp/whole --skip trl     # about a minute on an H100
    python benchmarks/estimate_check.py /tmp/whole/whole_run.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("whole_run_json", type=Path)
    args = ap.parse_args()
    from sftop.engine.planner.runtime import calibration, estimate_run_time

    result = json.loads(args.whole_run_json.read_text())["sftop"]
    plan = SimpleNamespace(**result["plan"], context=None)
    steps = int(result["steps"])
    preset = SimpleNamespace(
        train=SimpleNamespace(max_steps=steps, epochs=1.0), plan=SimpleNamespace(price_per_gpu_hour=None)
    )
    estimate = estimate_run_time(plan, preset)
    if estimate is None:
        print(f"no estimate for {plan.gpu_name!r} on {plan.device}")
        return 1
    measured_step = result["train_s"] / steps
    rows = [
        ("seconds a step", estimate.step_s, measured_step),
        ("training s", steps * estimate.step_s, result["train_s"]),
        ("start to end s", estimate.wall_s, result["runtime_s"]),
    ]
    print(f"{plan.gpu_name}, {steps} steps, {estimate.basis}; calibration {calibration()}")
    print(f"{'':16} {'estimate':>10} {'measured':>10} {'est/meas':>9}")
    for label, est, meas in rows:
        print(f"{label:16} {est:10.3f} {meas:10.3f} {est / meas:9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
