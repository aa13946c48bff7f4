"""What this node can take: host resources (psutil), GPUs (NVML), throughput."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)


class ThroughputMeter:
    """Tokens per second over a sliding window; safe to feed from threads."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        with self._lock:
            self._events.append((time.monotonic(), tokens))

    def rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._events and now - self._events[0][0] > self._window_s:
                self._events.popleft()
            if not self._events:
                return 0.0
            total = sum(tokens for _, tokens in self._events)
        return total / self._window_s


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_percent: float


def models_gpu(gpu_layers: int, gpus: list[GpuReading]) -> GpuReading | None:
    """The GPU models live on: with every layer on a GPU (-1), weights and KV
    cache sit in GPU memory (the largest GPU's: llama.cpp's main device);
    None: in host memory."""
    if gpu_layers < 0 and gpus:
        return max(gpus, key=lambda g: g.memory_total_bytes)
    return None


def model_memory_total(
    gpu_layers: int, host_total_bytes: int, gpus: list[GpuReading]
) -> tuple[int, str]:
    """The memory models live in, which ``--memory-budget`` is a share of, and its name."""
    gpu = models_gpu(gpu_layers, gpus)
    if gpu is not None:
        return gpu.memory_total_bytes, f"GPU {gpu.index} ({gpu.name})"
    return host_total_bytes, "host memory"


class GpuProbe:
    """NVIDIA GPUs through NVML; no GPUs when NVML or a driver is absent."""

    def __init__(self) -> None:
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            log.info("NVML: %d GPU(s)", pynvml.nvmlDeviceGetCount())
        except Exception as exc:  # no driver, no library, no GPU: all mean "no GPU"
            log.debug("NVML unavailable: %s", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        if nvml is None:
            return []
        readings = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
                name = nvml.nvmlDeviceGetName(handle)
                readings.append(
                    GpuReading(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        memory_total_bytes=int(memory.total),
                        memory_used_bytes=int(memory.used),
                        utilization_percent=float(utilization.gpu),
                    )
                )
        except Exception as exc:
            log.warning("NVML read failed: %s", exc)
        return readings

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


@dataclass(frozen=True)
class HostReading:
    cpu_count: int
    cpu_percent: float
    load_average_1m: float
    memory_total_bytes: int
    memory_available_bytes: int
    process_rss_bytes: int


LOW_BATTERY_PERCENT = 20.0
POWER_READ_EVERY_S = 10.0  # sensors are sysfs reads: not on every heartbeat


@dataclass(frozen=True)
class PowerReading:
    on_battery: bool = False
    battery_percent: float = -1.0  # -1: no battery
    temperature_c: float = 0.0  # the hottest sensor; 0: none readable
    throttled: bool = False  # some sensor at or over its "high" mark

    @property
    def low_power(self) -> bool:
        """Placement avoids it: on battery under the low mark, or throttled."""
        low_battery = self.on_battery and 0 <= self.battery_percent < LOW_BATTERY_PERCENT
        return low_battery or self.throttled


def power_from(battery, temperatures) -> PowerReading:
    """psutil's ``sensors_battery()`` (None: no battery) and
    ``sensors_temperatures()`` (name -> readings with current/high) as one reading."""
    readings = [r for group in (temperatures or {}).values() for r in group]
    hottest = max((float(r.current) for r in readings if r.current is not None), default=0.0)
    throttled = any(r.high and r.current is not None and r.current >= r.high for r in readings)
    if battery is None:
        return PowerReading(temperature_c=hottest, throttled=throttled)
    return PowerReading(
        on_battery=not battery.power_plugged,
        battery_percent=float(battery.percent),
        temperature_c=hottest,
        throttled=throttled,
    )


class HostProbe:
    def __init__(self) -> None:
        self._process = psutil.Process(os.getpid())
        psutil.cpu_percent(interval=None)  # prime: the first call has no interval
        self._power: tuple[float, PowerReading] | None = None

    def power(self) -> PowerReading:
        """Battery and heat, read at most every POWER_READ_EVERY_S."""
        now = time.monotonic()
        if self._power is None or now - self._power[0] > POWER_READ_EVERY_S:
            battery = temperatures = None
            try:
                battery = getattr(psutil, "sensors_battery", lambda: None)()
                temperatures = getattr(psutil, "sensors_temperatures", dict)()
            except (OSError, RuntimeError, AttributeError):
                pass  # unreadable sensors: nothing known
            self._power = (now, power_from(battery, temperatures))
        return self._power[1]

    def rss(self) -> int:
        return int(self._process.memory_info().rss)

    def read(self) -> HostReading:
        memory = psutil.virtual_memory()
        return HostReading(
            cpu_count=psutil.cpu_count(logical=True) or 1,
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            load_average_1m=float(psutil.getloadavg()[0]),
            memory_total_bytes=int(memory.total),
            memory_available_bytes=int(memory.available),
            process_rss_bytes=self.rss(),
        )
