"""What the GPUs are and how much memory is free on them, read through NVML.

Importing this module never touches a GPU: NVML is loaded on the first read, and every field is
read on its own so a field the card or driver does not support is None ("N/A") rather than an
error. With no driver, no NVML or no GPU, `read_gpus()` returns `gpus=[]` and a `reason` that
says why and what to do, so `sftop doctor`, the TUI and the planner can show it instead of a
traceback.

NVML numbers GPUs by PCI order while CUDA (and so torch) numbers the GPUs that
`CUDA_VISIBLE_DEVICES` leaves, in the order it lists them. Each `GpuInfo.index` is the CUDA
index, the one that goes into "cuda:N"; `nvml_index` is NVML's.

Memory used by other processes counts against the budget: `memory_free_bytes` is total minus
used as NVML sees it, across every process on the card.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, TypeVar

GIB = 1024**3

NO_DRIVER_HINT = "install the NVIDIA driver or run on a GPU machine; sftop will plan for the CPU"


class NvmlUnavailable(Exception):
    """NVML cannot be used at all; the message is the user-facing reason."""


class NvmlBackend(Protocol):
    """The few NVML calls sftop makes. Each raises `pynvml.NVMLError` when a field is unsupported.

    `start()` raises `NvmlUnavailable` with a user-facing reason when NVML cannot be used.
    """

    def start(self) -> None: ...

    def driver_version(self) -> str: ...

    def device_count(self) -> int: ...

    def name(self, i: int) -> str: ...

    def uuid(self, i: int) -> str: ...

    def memory(self, i: int) -> tuple[int, int]:
        """(total bytes, used bytes)."""
        ...

    def utilization(self, i: int) -> tuple[int, int]:
        """(GPU busy percent, memory-controller busy percent)."""
        ...

    def temperature_c(self, i: int) -> int: ...

    def power_w(self, i: int) -> float: ...

    def power_limit_w(self, i: int) -> float: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PynvmlBackend:
    """The real backend: nvidia-ml-py (`import pynvml`), initialised once per process."""

    _lock = threading.Lock()
    _started = False

    def __init__(self) -> None:
        self._handles: dict[int, Any] = {}

    def start(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # the dependency is declared, but a broken install must not crash
            raise NvmlUnavailable(f"nvidia-ml-py is not installed ({exc}): run `pip install nvidia-ml-py`") from exc
        self._nvml = pynvml
        with PynvmlBackend._lock:
            if PynvmlBackend._started:
                return
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                code = getattr(exc, "value", None)
                if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
                    reason = f"NVIDIA driver not found (libnvidia-ml.so): {NO_DRIVER_HINT}"
                elif code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
                    reason = (
                        "NVIDIA driver is installed but not loaded (no GPU, or the kernel module failed): "
                        "check `nvidia-smi`; sftop will plan for the CPU"
                    )
                elif code == pynvml.NVML_ERROR_NO_PERMISSION:
                    reason = "no permission to query the GPU through NVML: check /dev/nvidia* access"
                else:
                    reason = f"NVML failed to start ({exc}): check `nvidia-smi`"
                raise NvmlUnavailable(reason) from exc
            except OSError as exc:
                raise NvmlUnavailable(f"NVIDIA driver library could not be loaded ({exc}): {NO_DRIVER_HINT}") from exc
            PynvmlBackend._started = True

    def _handle(self, i: int) -> Any:
        if i not in self._handles:
            self._handles[i] = self._nvml.nvmlDeviceGetHandleByIndex(i)
        return self._handles[i]

    def driver_version(self) -> str:
        return _text(self._nvml.nvmlSystemGetDriverVersion())

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def name(self, i: int) -> str:
        return _text(self._nvml.nvmlDeviceGetName(self._handle(i)))

    def uuid(self, i: int) -> str:
        return _text(self._nvml.nvmlDeviceGetUUID(self._handle(i)))

    def memory(self, i: int) -> tuple[int, int]:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle(i))
        return int(info.total), int(info.used)

    def utilization(self, i: int) -> tuple[int, int]:
        rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle(i))
        return int(rates.gpu), int(rates.memory)

    def temperature_c(self, i: int) -> int:
        return int(self._nvml.nvmlDeviceGetTemperature(self._handle(i), self._nvml.NVML_TEMPERATURE_GPU))

    def power_w(self, i: int) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle(i)) / 1000.0  # NVML reports milliwatts

    def power_limit_w(self, i: int) -> float:
        return self._nvml.nvmlDeviceGetEnforcedPowerLimit(self._handle(i)) / 1000.0


_default_backend: NvmlBackend | None = None


def default_backend() -> NvmlBackend:
    global _default_backend
    if _default_backend is None:
        _default_backend = PynvmlBackend()
    return _default_backend


T = TypeVar("T")


def _nvml_error() -> type[Exception]:
    try:
        from pynvml import NVMLError
    except ImportError:  # then start() has already said NVML is unavailable
        return NvmlUnavailable
    return NVMLError


def _maybe(fn: Callable[..., T], *args: Any) -> T | None:
    """One NVML field, `fn(*args)`: None when the card, driver or MIG mode does not support it."""
    try:
        return fn(*args)
    except _nvml_error():
        return None


@dataclass
class GpuInfo:
    index: int  # CUDA index after CUDA_VISIBLE_DEVICES: the N in "cuda:N"
    nvml_index: int
    name: str
    uuid: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    utilization_pct: int | None = None
    memory_utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    # Short names used by `sftop doctor`.
    @property
    def memory_total(self) -> int | None:
        return self.memory_total_bytes

    @property
    def memory_used(self) -> int | None:
        return self.memory_used_bytes

    @property
    def total_gib(self) -> float | None:
        return None if self.memory_total_bytes is None else self.memory_total_bytes / GIB

    @property
    def used_gib(self) -> float | None:
        return None if self.memory_used_bytes is None else self.memory_used_bytes / GIB

    @property
    def free_gib(self) -> float | None:
        return None if self.memory_free_bytes is None else self.memory_free_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(device=self.device, total_gib=self.total_gib, used_gib=self.used_gib, free_gib=self.free_gib)
        return data

    def one_line(self) -> str:
        def num(value: float | None, fmt: str) -> str:
            return "N/A" if value is None else format(value, fmt)

        return (
            f"{self.device} {self.name}: {num(self.free_gib, '.1f')} of {num(self.total_gib, '.1f')} GiB free, "
            f"util {num(self.utilization_pct, 'd')}%, {num(self.temperature_c, 'd')} C, "
            f"{num(self.power_w, '.0f')} W"
        )


@dataclass
class GpuStatus:
    gpus: list[GpuInfo] = field(default_factory=list)
    reason: str | None = None  # why there are no GPUs (or why some were left out)
    driver_version: str | None = None
    cuda_visible_devices: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.gpus)

    def best(self) -> GpuInfo | None:
        """The GPU with the most free memory (lowest index on ties): where a one-GPU run goes."""
        usable = [g for g in self.gpus if g.memory_free_bytes is not None]
        if not usable:
            return None
        return max(usable, key=lambda g: (g.memory_free_bytes, -g.index))

    def summary(self) -> str:
        lines = [g.one_line() for g in self.gpus]
        if self.reason:
            lines.append(self.reason if self.gpus else f"No GPU: {self.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gpus": [g.to_dict() for g in self.gpus],
            "reason": self.reason,
            "driver_version": self.driver_version,
            "cuda_visible_devices": self.cuda_visible_devices,
        }


@dataclass
class GpuSample:
    index: int
    memory_used_gib: float | None
    memory_total_gib: float | None
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def visible_nvml_indices(env_value: str | None, uuids: list[str | None]) -> tuple[list[int], str | None]:
    """Map CUDA_VISIBLE_DEVICES onto NVML indices, in CUDA order, the way the CUDA runtime does.

    Entries are NVML indices or UUIDs (with or without the `GPU-` prefix; a unique prefix is
    enough). CUDA stops at the first entry it cannot resolve and ignores the rest, so do we, and
    say so. Returns (indices, note) where note explains anything dropped.
    """
    count = len(uuids)
    if env_value is None:
        return list(range(count)), None
    entries = [e.strip() for e in env_value.split(",")]
    if entries == [""]:
        return [], "CUDA_VISIBLE_DEVICES is set but empty, which hides every GPU: unset it to use them"
    chosen: list[int] = []
    for entry in entries:
        found: int | None = None
        problem = None
        if entry.lstrip("-").isdigit():
            value = int(entry)
            if 0 <= value < count:
                found = value
            else:
                problem = f"no GPU with index {value}" + (" (-1 hides all GPUs)" if value < 0 else "")
        elif entry.upper().startswith("MIG-"):
            problem = f"MIG instance {entry}: sftop does not read MIG slices yet, give a whole GPU"
        else:
            wanted = entry.lower()
            if not wanted.startswith("gpu-"):
                wanted = "gpu-" + wanted
            matches = [i for i, u in enumerate(uuids) if u and u.lower().startswith(wanted)]
            if len(matches) == 1:
                found = matches[0]
            else:
                problem = f"UUID {entry} matches {'no' if not matches else 'more than one'} GPU"
        if found is None:
            return chosen, (f"CUDA_VISIBLE_DEVICES={env_value!r}: {problem}; CUDA ignores this entry and all after it")
        if found in chosen:
            return (
                chosen,
                f"CUDA_VISIBLE_DEVICES={env_value!r} lists GPU {entry} twice; CUDA ignores it and all after it",
            )
        chosen.append(found)
    return chosen, None


def read_gpus(backend: NvmlBackend | None = None, env: dict[str, str] | None = None) -> GpuStatus:
    """Every GPU this process may use, with its memory and health. Never raises."""
    backend = backend or default_backend()
    environ = os.environ if env is None else env
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    try:
        backend.start()
    except NvmlUnavailable as exc:
        return GpuStatus(reason=str(exc), cuda_visible_devices=visible)
    count = _maybe(backend.device_count) or 0
    driver = _maybe(backend.driver_version)
    if count == 0:
        return GpuStatus(
            reason="the NVIDIA driver sees no GPU: check `nvidia-smi`; sftop will plan for the CPU",
            driver_version=driver,
            cuda_visible_devices=visible,
        )
    uuids = [_maybe(backend.uuid, i) for i in range(count)]
    indices, note = visible_nvml_indices(visible, uuids)
    gpus = []
    for cuda_index, i in enumerate(indices):
        memory = _maybe(backend.memory, i)
        total, used = memory if memory else (None, None)
        util = _maybe(backend.utilization, i)
        gpus.append(
            GpuInfo(
                index=cuda_index,
                nvml_index=i,
                name=_maybe(backend.name, i) or "unknown NVIDIA GPU",
                uuid=uuids[i],
                memory_total_bytes=total,
                memory_used_bytes=used,
                memory_free_bytes=None if total is None or used is None else max(0, total - used),
                utilization_pct=util[0] if util else None,
                memory_utilization_pct=util[1] if util else None,
                temperature_c=_maybe(backend.temperature_c, i),
                power_w=_maybe(backend.power_w, i),
                power_limit_w=_maybe(backend.power_limit_w, i),
            )
        )
    if not gpus and note is None:
        note = "no GPU is visible"
    return GpuStatus(gpus=gpus, reason=note, driver_version=driver, cuda_visible_devices=visible)


_sample_map: tuple[str | None, list[int]] | None = None


def sample_gpus(backend: NvmlBackend | None = None, env: dict[str, str] | None = None) -> list[GpuSample]:
    """Cheap per-interval reading of the visible GPUs (memory, utilisation, temperature, power).

    The CUDA_VISIBLE_DEVICES mapping is worked out once per distinct value and cached (for the
    default backend), so each call costs only the four NVML reads per GPU. Never raises.
    """
    global _sample_map
    environ = os.environ if env is None else env
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    real = backend is None
    backend = backend or default_backend()
    try:
        backend.start()
    except NvmlUnavailable:
        return []
    if real and _sample_map is not None and _sample_map[0] == visible:
        indices = _sample_map[1]
    else:
        count = _maybe(backend.device_count) or 0
        uuids = [_maybe(backend.uuid, i) for i in range(count)]
        indices, _ = visible_nvml_indices(visible, uuids)
        if real:
            _sample_map = (visible, indices)
    samples = []
    for cuda_index, i in enumerate(indices):
        memory = _maybe(backend.memory, i)
        util = _maybe(backend.utilization, i)
        samples.append(
            GpuSample(
                index=cuda_index,
                memory_used_gib=memory[1] / GIB if memory else None,
                memory_total_gib=memory[0] / GIB if memory else None,
                utilization_pct=util[0] if util else None,
                temperature_c=_maybe(backend.temperature_c, i),
                power_w=_maybe(backend.power_w, i),
            )
        )
    return samples
