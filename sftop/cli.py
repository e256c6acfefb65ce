"""The `sftop` command line.

`sftop` alone opens the TUI; every subcommand is a thin front for an engine function, so the TUI,
the CLI and the tests all run the same code. Heavy imports (torch, transformers, textual) happen
inside the handlers, so `sftop --help` stays instant.

User errors (`SftopError`) print as one paragraph and exit non-zero; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from sftop import __version__
from sftop.engine.errors import SftopError


def _out(text: str = "") -> None:
    print(text, flush=True)


def _color() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


# --- presets -------------------------------------------------------------------------------------


def cmd_presets(args: argparse.Namespace) -> int:
    from sftop.engine.presets import list_presets, load_preset, to_toml

    if args.action == "list" or args.action is None:
        presets = list_presets()
        width = max((len(p.name) for p in presets), default=4)
        for p in presets:
            _out(f"{p.name:<{width}}  {p.origin:<8}  {p.description}")
        return 0
    if not args.name:
        raise SftopError("`sftop presets show` needs a preset name", hint="Run `sftop presets list` to see them")
    preset, path = load_preset(args.name, args.set)
    _out(f"# {path}")
    _out(to_toml(preset).rstrip())
    from sftop.engine.models.vision.lora_parts import parts_summary

    summary = parts_summary(preset)
    if summary:
        _out(f"# {summary}")
    return 0


# --- data ----------------------------------------------------------------------------------------


def cmd_data(args: argparse.Namespace) -> int:
    from sftop.engine.data.check import check_data, render_check
    from sftop.engine.presets import load_preset

    preset, _ = load_preset(args.preset, args.set)
    from sftop.engine.train.vision_data import vision_check_kwargs

    result = check_data(preset, **vision_check_kwargs(preset))  # a VLM: its exact image tokens
    if getattr(args, "json", False):
        _out(json.dumps(result.to_dict(), indent=2))
    else:
        _out(render_check(result, color=_color()))
    # Scripts gate on this: a run of this preset would stop on bad data, so the check fails too.
    return 1 if result.would_stop else 0


# --- plan ----------------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from sftop.engine.planner import load_model_config, render_plan
    from sftop.engine.presets import load_preset

    preset, _ = load_preset(args.preset, args.set)
    from sftop.engine.train.vision_data import image_tokens_for_plan

    # a vision-language model: the rows' exact image tokens size the image terms, as in a run
    image_tokens = image_tokens_for_plan(preset)
    from sftop.engine.planner.multi import plan_preset

    plan = plan_preset(
        preset, load_model_config(preset), gpu_memory_gib=args.gpu_memory, image_tokens_per_row=image_tokens
    )
    if args.data:
        # packed text: the rows' real lengths, as `sftop run` sizes them (tokenising imports the ML stack)
        from sftop.engine.train.plan_data import sized_for_preset_data

        plan = sized_for_preset_data(plan, preset)
    elif plan.packing and plan.context is not None and preset.train.task == "sft":
        plan.notes.append(
            "sized for data.max_length; `sftop run` sizes packed micro-batches for the rows "
            "themselves (`sftop plan --data` shows that plan)"
        )
    from sftop.engine.planner.runtime import describe_run_time, estimate_run_time

    run_time = estimate_run_time(plan, preset, gpu_name=args.gpu)
    if args.json:
        _out(json.dumps({**plan.to_dict(), "estimate": run_time.to_dict() if run_time else None}, indent=2))
    else:
        line = describe_run_time(run_time, plan) + (f" ({run_time.basis})" if run_time else "")
        _out(render_plan(plan, color=_color(), run_time=line))
    return 0


# --- run / resume --------------------------------------------------------------------------------


def _run(preset_ref: str, overrides: list[str], run_dir_arg: str | None, resume: bool) -> int:
    from sftop.engine.presets import load_preset
    from sftop.engine.rundir import RunDir, new_run_dir

    preset, path = load_preset(preset_ref, overrides)  # before the heavy imports: a typo fails at once
    if not resume and not run_dir_arg:
        from sftop.engine.preflight import check_data_before_run

        check_data_before_run(preset)  # bad data fails in seconds, before a run directory exists
    from sftop.engine.train.runner import run_training

    if run_dir_arg:
        run_dir = RunDir(Path(run_dir_arg).expanduser().resolve()).create()
    elif resume and path.name == "preset.toml" and (path.parent / "events.jsonl").exists():
        run_dir = RunDir(path.parent.resolve())  # resuming the run this preset came from
    else:
        from sftop.engine.run_admin import run_label

        run_dir = new_run_dir(run_label(preset))
    from sftop.engine.runlock import run_lock
    from sftop.engine.runs import run_in_foreground

    with run_lock(run_dir.path):  # refused here, before status.json is touched, when a trainer lives there
        _prepare_run_dir(run_dir, preset, resume, explicit=bool(run_dir_arg))
        if not resume:
            _out(f"sftop: run directory {run_dir.path}")
        from sftop.engine.launch import run_processes_here, several_processes

        if several_processes(preset):  # plan.gpus: one process per GPU, started by accelerate launch
            return run_processes_here(run_dir, preset, resume)
        return run_in_foreground(run_dir, lambda: run_training(preset, run_dir, resume=resume))


def _prepare_run_dir(run_dir, preset, resume: bool, explicit: bool) -> None:
    from sftop.engine.rundir import register_run_dir
    from sftop.engine.train.resume_check import check_resume

    if resume:
        check_resume(run_dir, preset)
    if explicit:
        register_run_dir(run_dir)


def cmd_run(args: argparse.Namespace) -> int:
    if getattr(args, "detach", False):
        return _run_detached(args)
    return _run(args.preset, args.set, args.run_dir, args.resume)


def _run_detached(args: argparse.Namespace) -> int:
    """Start the run under the detached supervisor (as the TUI does) and return at once."""
    from sftop.engine.rundir import RunDir
    from sftop.engine.supervisor import launch_run

    run_dir = RunDir(Path(args.run_dir).expanduser().resolve()) if args.run_dir else None
    if not args.resume:
        from sftop.engine.presets import load_preset
        from sftop.engine.preflight import check_data_before_run

        check_data_before_run(load_preset(args.preset, args.set)[0])
    run = launch_run(args.preset, run_dir, resume=args.resume, overrides=args.set)
    _out(f"sftop: started {run.name} in the background ({run.path})")
    _out(f"  watch it:  sftop attach {run.name}")
    _out(f"  stop it:   sftop stop {run.name}")
    _out(f"  its log:   {run.stdout_log}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from sftop.engine.runs import find_run

    run = find_run(args.run)
    return _run(str(run.path / "preset.toml"), args.set, str(run.path), resume=True)


# --- export --------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from sftop.engine.export import export_run
    from sftop.engine.runs import find_run

    run = find_run(args.run_dir)
    if args.gguf:
        return _export_gguf(run, args)
    out = export_run(run, merged=args.merged, out=Path(args.out).expanduser() if args.out else None)
    _out(f"sftop: {'merged model' if args.merged else 'adapter'} written to {out}")
    return 0


def _export_gguf(run, args: argparse.Namespace) -> int:
    from sftop.engine.export.gguf import export_gguf

    if args.merged:
        raise SftopError(
            "--gguf always merges the adapter; --merged is for a Hugging Face model directory",
            where="--merged",
            hint="Drop --merged, or drop --gguf",
        )
    shown: dict[str, object] = {"phase": None, "tenth": -1}

    def progress(phase: str, done: int, total: int) -> None:
        tenth = done * 10 // max(total, 1)
        if phase != shown["phase"] or (phase == "write" and tenth != shown["tenth"]):
            label = {
                "load": "loading the base model",
                "merge": "merging the adapter",
                "write": f"writing {tenth * 10}%",
                "quantize": "quantizing with llama-quantize",
            }[phase]
            print(f"sftop: {label}", file=sys.stderr, flush=True)
            shown.update(phase=phase, tenth=tenth)

    out = export_gguf(run, kind=args.gguf, out=Path(args.out).expanduser() if args.out else None, progress=progress)
    gguf_file = next(out.glob("*.gguf"))
    _out(
        f"sftop: GGUF written to {gguf_file}\n"
        f"  llama.cpp: llama-cli -m {gguf_file} -cnv\n"
        f"  Ollama:    ollama create {run.path.name.lower()} -f {out / 'Modelfile'}"
    )
    return 0


# --- runs / attach / stop ------------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> int:
    from sftop.engine.run_admin import remove_run, render_runs
    from sftop.engine.runs import find_run, list_runs

    if getattr(args, "action", None) == "rm":
        if not args.run:
            raise SftopError("`sftop runs rm` needs a run name", hint="`sftop runs` lists the runs")
        _out(remove_run(find_run(args.run)))
        return 0
    runs = list_runs()
    if not runs:
        _out("No runs yet. Start one with `sftop run demo` or open the TUI with `sftop`.")
        return 0
    for line in render_runs(runs):
        _out(line)
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from sftop.engine.runs import find_run

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise SftopError(
            "`sftop attach` draws a dashboard and needs a terminal; its input or output is not one",
            where="standard input/output",
            hint="Run it in an interactive terminal (over SSH: `ssh -t`); from a script, `sftop runs` shows "
            "progress and each run's events.jsonl holds every event",
        )
    run = find_run(args.run)
    from sftop.tui import run_app

    return run_app(start="dashboard", run=run)


def cmd_stop(args: argparse.Namespace) -> int:
    from sftop.engine.runs import find_run, stop_run

    run = find_run(args.run)
    _out(stop_run(run, wait=args.wait))
    return 0


# --- doctor --------------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from sftop.engine.doctor import diagnose, render_report

    report = diagnose()
    _out(json.dumps(report.to_dict(), indent=2) if args.json else render_report(report, color=_color()))
    return 0 if report.ok else 1


def cmd_tui(args: argparse.Namespace) -> int:
    from sftop.tui import run_app

    return run_app(start="home", preset=getattr(args, "preset", None))


# --- parser --------------------------------------------------------------------------------------


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset key, e.g. --set train.max_steps=20 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftop",
        description="Fine-tune LLMs from a terminal. Run `sftop` alone for the TUI.",
    )
    parser.add_argument("--version", action="version", version=f"sftop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("tui", help="open the TUI (the default)")
    p.add_argument("preset", nargs="?", help="start the wizard with this preset")
    p.set_defaults(func=cmd_tui)

    p = sub.add_parser("run", help="train headless from a preset (name, user preset or .toml path)")
    p.add_argument("preset")
    _add_set(p)
    p.add_argument("--run-dir", help="write the run here instead of a new directory under the state dir")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument(
        "--detach",
        action="store_true",
        help="train in the background (survives closing the terminal); prints the run's name and returns",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a stopped or failed run from its newest complete checkpoint")
    p.add_argument("run", help="run directory or run name")
    _add_set(p)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("presets", help="list the presets, or show one with every key resolved")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?")
    _add_set(p)
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("data", help="check a preset's dataset before training")
    p.add_argument("action", choices=["check"])
    p.add_argument("preset")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="print the check as JSON")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("plan", help="show how the run would be sized for the GPU, and its memory breakdown")
    p.add_argument("preset")
    _add_set(p)
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="plan for a GPU with this much free memory")
    p.add_argument(
        "--gpu",
        metavar="NAME",
        help="estimate time and cost for this GPU model (H100, A100, L40S, "
        "RTX 4090, ...); with --gpu-memory, to price a GPU before renting it",
    )
    p.add_argument(
        "--data",
        action="store_true",
        help="read the preset's data and size packed micro-batches "
        "for its rows, as `sftop run` will (needs the tokenizer on disk; a few seconds)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("export", help="write a run's adapter, or with --merged a full merged model")
    p.add_argument("run_dir")
    p.add_argument("--merged", action="store_true", help="merge the adapter into the base model")
    p.add_argument("--out", help="output directory (default: inside the run directory)")
    p.add_argument(
        "--gguf",
        nargs="?",
        const="q8_0",
        metavar="TYPE",
        help="merge and write one GGUF file for llama.cpp/Ollama: f16, bf16, q8_0 (default), "
        "or a K-quant such as q4_k_m (needs llama.cpp's llama-quantize on PATH)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("runs", help="list runs; `sftop runs rm RUN` removes a run that is not running")
    p.add_argument("action", nargs="?", choices=["list", "rm"], default="list")
    p.add_argument("run", nargs="?", help="for rm: run name or directory")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("attach", help="open the dashboard on a run (default: the newest)")
    p.add_argument("run", nargs="?")
    p.set_defaults(func=cmd_attach)

    p = sub.add_parser("stop", help="stop a run: it saves a checkpoint first")
    p.add_argument("run")
    p.add_argument("--wait", action="store_true", help="wait until the run has exited")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("doctor", help="check Python, torch, CUDA, GPUs, disk and terminal")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
    return parser


def _quiet_known_noise() -> None:
    # bitsandbytes warns on every CPU import that an optional hub-downloaded kernel is missing; sftop
    # never uses that kernel (and never downloads at run time), so the warning only confuses users.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_known_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = getattr(args, "func", cmd_tui)
    try:
        return int(func(args) or 0)
    except SftopError as exc:
        print(f"sftop: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sftop: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # before OSError, of which it is one
        return _reader_went_away()
    except OSError as exc:
        from sftop.engine.diskfull import DiskFullError, is_disk_full

        if not is_disk_full(exc):
            raise
        error = DiskFullError(Path(exc.filename).parent if getattr(exc, "filename", None) else Path.cwd(), None)
        print(f"sftop: error: {error}", file=sys.stderr, flush=True)
        return error.exit_code


def _reader_went_away() -> int:
    """`sftop runs | head -1`: the reader closed the pipe. End quietly, as `ls | head` does."""
    # Point stdout at /dev/null so the interpreter's final flush does not raise a second time.
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)
    return 128 + 13  # killed by SIGPIPE, as shell tools report it


if __name__ == "__main__":
    sys.exit(main())
