"""`model.adapter`: start a run from the LoRA adapter an earlier run trained (DPO usually follows SFT).

Accepted values: an adapter directory (`adapter_config.json` inside), a run directory or run name
(its final adapter, or for a stopped run its newest complete checkpoint), or `latest:PRESET`, the
newest run of preset PRESET that has an adapter.
"""

from __future__ import annotations

from pathlib import Path

from sftop.engine.errors import ModelError, SftopError

LATEST = "latest:"


def resolve_adapter(ref: str, key: str = "model.adapter") -> Path:
    from sftop.engine.export import find_adapter
    from sftop.engine.rundir import list_run_dirs
    from sftop.engine.runs import find_run, summarize

    where = f"{key} = {ref!r}"
    path = Path(ref).expanduser()
    if (path / "adapter_config.json").is_file():
        return path.resolve()
    if ref.startswith(LATEST):
        preset = ref[len(LATEST) :]
        for run in list_run_dirs():  # newest first
            if summarize(run).preset_name != preset:
                continue
            try:
                return find_adapter(run)
            except SftopError:
                continue
        raise ModelError(
            f"No run of preset `{preset}` has an adapter to start from",
            where=where,
            hint=f"Train it first (`sftop run {preset}`), or give a run name or adapter directory",
        )
    try:
        return find_adapter(find_run(ref))
    except SftopError as exc:
        raise ModelError(
            f"Cannot find the adapter to start from: {exc}",
            where=where,
            hint="Give a run name (`sftop runs` lists them), a run directory, an adapter directory, or latest:PRESET",
        ) from None
