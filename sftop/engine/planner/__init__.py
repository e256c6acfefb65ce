"""The VRAM planner: size every run so it fits the GPU and runs as fast as the memory allows.

Public interface (documented in docs/planner.md):
- `load_model_config(preset)`: the model's config, no weights.
- `plan_run(preset, model_config, *, gpus=None, gpu_memory_gib=None, row_tokens_mean=None) -> Plan`.
- `render_plan(plan, color=False) -> str`; `Plan.to_dict()`.
- while running: `run_probe` (or `probe_shape` + `check_probe`), `step_down`, `on_oom`.
"""

from sftop.engine.planner.config import load_model_config
from sftop.engine.planner.estimate import Estimate, ModelShape, Setup, estimate
from sftop.engine.planner.render import render_plan
from sftop.engine.planner.solve import Constraints, Plan, plan_run, replan
from sftop.engine.planner.verify import ProbeVerdict, check_probe, on_oom, probe_shape, run_probe, step_down

__all__ = [
    "Constraints",
    "Estimate",
    "ModelShape",
    "Plan",
    "ProbeVerdict",
    "Setup",
    "check_probe",
    "estimate",
    "load_model_config",
    "on_oom",
    "plan_run",
    "probe_shape",
    "render_plan",
    "replan",
    "run_probe",
    "step_down",
]
