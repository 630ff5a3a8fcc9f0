"""Energy meters for one rank: NVML for a GPU, RAPL for a CPU package, or nothing.

No torch and no mpi4py here: the meters must work (or degrade to "unavailable") on any node.
A meter reports joules since it was opened; a missing counter reads None, never 0.0, so that
"no data" can never be averaged in as "no energy". Ranks that share a device report the same
`device_key`; `owners()` picks one rank per device so device energy is not double-counted.
"""
from __future__ import annotations

import glob
import os
import socket
import threading
import time
from dataclasses import dataclass

try:
    import pynvml
except ImportError:  # nvidia-ml-py not installed: GPU meters are simply unavailable
    pynvml = None

SOURCES = ("nvml-energy", "nvml-power", "rapl", "unavailable")
RAPL_ROOT = "/sys/class/powercap"  # module-level so tests can point it at a fake tree
NVML_ENERGY_PERIOD_S = 0.1  # conservative: the driver refreshes the energy counter ~every 20-100 ms
POWER_INTERVAL_S = 0.05  # sampling interval of the power fallback
RAPL_PERIOD_S = 0.001
RAPL_POLL_S = 30.0  # background read so that at most one wrap happens between two reads


class EnergyMeter:
    """Joules accumulated since the meter was opened."""

    source = "unavailable"
    device_key = ""
    update_period_s = 0.0
    reason = ""  # why a meter is unavailable or fell back; for the run log

    def read(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class UnavailableMeter(EnergyMeter):
    def __init__(self, reason: str = ""):
        self.reason = reason


def counter_delta(before: int, after: int, max_range: int | None) -> int:
    """Increase of a counter that wraps to 0 after max_range; after < before means one wrap."""
    if after >= before:
        return after - before
    if not max_range:
        raise ValueError(f"counter went backwards ({before} -> {after}) with no known range")
    return max_range - before + after


def owners(device_keys: list[str]) -> list[bool]:
    """True for the first rank holding each non-empty device key, False for the rest."""
    seen, out = set(), []
    for key in device_keys:
        out.append(bool(key) and key not in seen)
        if key:
            seen.add(key)
    return out


def short_window(seconds: float, meter: EnergyMeter) -> bool:
    """A window under two counter updates can read as zero or double; flag it as untrusted."""
    return seconds < 2.0 * meter.update_period_s


def _text(value) -> str:
    # pynvml returns bytes or str depending on its version
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Gpu:
    """A rank's CUDA device as CUDA numbers it: `index` among the visible devices, the `uuid`
    torch reports ('' when unknown) and CUDA_VISIBLE_DEVICES as the rank saw it (None: unset)."""

    index: int
    uuid: str = ""
    visible: str | None = None


def gpu_of(index: int, uuid: str = "", env=None) -> Gpu:
    env = os.environ if env is None else env
    return Gpu(index, uuid, env.get("CUDA_VISIBLE_DEVICES"))


def _by_uuid(text: str):
    """Handle for a full or leading-part GPU-/MIG- UUID (CUDA accepts a unique prefix)."""
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(text)
    except Exception:
        pass
    matches = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        if _text(pynvml.nvmlDeviceGetUUID(h)).startswith(text):
            matches.append(h)
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} NVML devices match {text!r}")
    return matches[0]


def nvml_handle(gpu):
    """(NVML handle, how it was found) of a rank's device. NVML numbers GPUs on the PCI bus and
    ignores CUDA_VISIBLE_DEVICES, so torch's index is not an NVML index: match by the UUID torch
    reports, else through CUDA_VISIBLE_DEVICES (indices or UUIDs), else (nothing hidden) by index.
    An int is an NVML index as it is."""
    if isinstance(gpu, int):
        return pynvml.nvmlDeviceGetHandleByIndex(gpu), f"NVML index {gpu}"
    tried = []
    if gpu.uuid:
        uuid = gpu.uuid if gpu.uuid.startswith(("GPU-", "MIG-")) else "GPU-" + gpu.uuid
        try:
            return _by_uuid(uuid), "uuid"
        except Exception as e:  # e.g. a MIG instance torch names differently
            tried.append(f"uuid {uuid}: {e!r}")
    if gpu.visible is not None:
        entries = [e.strip() for e in gpu.visible.split(",") if e.strip()]
        if gpu.index >= len(entries):
            raise LookupError(f"CUDA device {gpu.index} is not in CUDA_VISIBLE_DEVICES={gpu.visible!r}; "
                              + "; ".join(tried))
        entry = entries[gpu.index]
        how = f"CUDA_VISIBLE_DEVICES entry {gpu.index} = {entry}"
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry)), how
        return _by_uuid(entry), how
    return pynvml.nvmlDeviceGetHandleByIndex(gpu.index), f"index {gpu.index} (CUDA_VISIBLE_DEVICES unset)"


def _whole_gpu(handle):
    """(handle of the physical GPU, note): a MIG instance has no energy counter of its own."""
    try:
        is_mig = pynvml.nvmlDeviceIsMigDeviceHandle(handle)
    except Exception:
        return handle, ""
    if not is_mig:
        return handle, ""
    parent = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    return parent, "MIG instance: energy and power are those of the whole GPU"


class _Nvml:
    """One nvmlInit per meter, paired with one nvmlShutdown (NVML reference-counts them)."""

    def __init__(self, gpu):
        pynvml.nvmlInit()
        self.open = True
        try:
            handle, self.how = nvml_handle(gpu)
            self.handle, self.note = _whole_gpu(handle)
            self.uuid = _text(pynvml.nvmlDeviceGetUUID(self.handle))
        except Exception:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        # once only: an extra nvmlShutdown would release another meter's reference
        if self.open:
            self.open = False
            try:
                pynvml.nvmlShutdown()
            except Exception:
                pass


class NvmlEnergyMeter(EnergyMeter):
    source = "nvml-energy"
    update_period_s = NVML_ENERGY_PERIOD_S

    def __init__(self, nvml: _Nvml):
        self._nvml = nvml
        self.device_key = "gpu:" + nvml.uuid
        self.reason = nvml.note
        # millijoules since the driver loaded; raises NVMLError_NotSupported on older GPUs
        self._start_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(nvml.handle)

    def read(self) -> float | None:
        try:
            now_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml.handle)
        except Exception:
            return None
        return (now_mj - self._start_mj) / 1000.0

    def close(self) -> None:
        self._nvml.shutdown()


class NvmlPowerMeter(EnergyMeter):
    """Integrates nvmlDeviceGetPowerUsage (mW) with the trapezoid rule on a background thread.

    Coarser than the energy counter: the driver's power value is itself averaged over a short
    window, so short spikes are smoothed. read() takes one more sample so it integrates up to now.
    """

    source = "nvml-power"

    def __init__(self, nvml: _Nvml, interval_s: float = POWER_INTERVAL_S, clock=time.monotonic):
        self._nvml = nvml
        self.device_key = "gpu:" + nvml.uuid
        self.update_period_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._joules, self.samples, self._failed = 0.0, 0, False
        self._last_t = clock()
        self._last_w = pynvml.nvmlDeviceGetPowerUsage(nvml.handle) / 1000.0  # raises if unsupported
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-power", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with self._lock:
            try:
                watts = pynvml.nvmlDeviceGetPowerUsage(self._nvml.handle) / 1000.0
            except Exception:
                self._failed = True  # a gap we cannot integrate over: the total is no longer valid
                return
            t = self._clock()
            self._joules += 0.5 * (watts + self._last_w) * (t - self._last_t)
            self._last_t, self._last_w = t, watts
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.update_period_s):
            self._sample()

    def read(self) -> float | None:
        if not self._stop.is_set():
            self._sample()
        with self._lock:
            return None if self._failed else self._joules

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=5.0)
            self._nvml.shutdown()


def _read_int(path: str) -> int:
    with open(path) as f:
        return int(f.read())


class RaplMeter(EnergyMeter):
    """Sums the package domains of /sys/class/powercap/intel-rapl:N (microjoule counters).

    The counters wrap at max_energy_range_uj (minutes at high power), so a daemon thread reads
    every RAPL_POLL_S to keep at most one wrap between two reads.
    """

    source = "rapl"
    update_period_s = RAPL_PERIOD_S

    def __init__(self, root: str | None = None, poll_s: float = RAPL_POLL_S):
        root = RAPL_ROOT if root is None else root
        self._domains = []  # [energy_uj path, max range, last raw value]
        names = []
        for d in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
            try:
                with open(os.path.join(d, "name")) as f:
                    name = f.read().strip()
                if not name.startswith("package"):  # skip core/dram sub-domains and psys
                    continue
                path = os.path.join(d, "energy_uj")
                # reading energy_uj is root-only on many kernels since 5.10: OSError -> skip
                self._domains.append([path, _read_int(os.path.join(d, "max_energy_range_uj")),
                                      _read_int(path)])
                names.append(name)
            except (OSError, ValueError):
                continue
        if not self._domains:
            raise OSError(f"no readable RAPL package domain under {root}")
        self.device_key = f"cpu:{socket.gethostname()}:{','.join(names)}"
        self._uj, self._failed = 0, False
        self._lock, self._stop, self._thread = threading.Lock(), threading.Event(), None
        if poll_s > 0:
            self._thread = threading.Thread(target=self._poll, args=(poll_s,),
                                            name="rapl-poll", daemon=True)
            self._thread.start()

    def _poll(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            self.read()

    def read(self) -> float | None:
        with self._lock:
            if self._failed:
                return None
            try:
                for dom in self._domains:
                    raw = _read_int(dom[0])
                    self._uj += counter_delta(dom[2], raw, dom[1])
                    dom[2] = raw
            except (OSError, ValueError):
                self._failed = True
                return None
            return self._uj / 1e6

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


def _open_nvml(gpu, prefer: str) -> EnergyMeter:
    if pynvml is None:
        return UnavailableMeter("pynvml (nvidia-ml-py) not installed")
    try:
        nvml = _Nvml(gpu)
    except Exception as e:  # no driver, no library, no such device
        return UnavailableMeter(f"NVML: no device for {gpu}: {e!r}")
    energy_error = ""
    if prefer in ("auto", "nvml-energy"):
        try:
            return NvmlEnergyMeter(nvml)
        except Exception as e:  # NotSupported before Volta, FunctionNotFound on old drivers
            energy_error = f"energy counter: {e!r}"
    if prefer in ("auto", "nvml-power"):
        try:
            meter = NvmlPowerMeter(nvml, interval_s=POWER_INTERVAL_S)
            meter.reason = "; ".join(filter(None, (energy_error, nvml.note)))
            return meter
        except Exception as e:
            energy_error = f"{energy_error}; power: {e!r}".lstrip("; ")
    nvml.shutdown()
    return UnavailableMeter(energy_error)


def open_meter(gpu, prefer: str = "auto") -> EnergyMeter:
    """Best meter for this rank's device (a Gpu, an NVML index, or None for a CPU rank); never
    raises because hardware is missing. An unavailable meter says why in `reason`."""
    if prefer != "auto" and prefer not in SOURCES:
        raise ValueError(f"prefer must be 'auto' or one of {SOURCES}, got {prefer!r}")
    if prefer == "unavailable":
        return UnavailableMeter("energy metering switched off")
    if prefer == "rapl" or (gpu is None and prefer == "auto"):
        try:
            return RaplMeter()
        except Exception as e:
            return UnavailableMeter(f"RAPL: {e}")
    if gpu is None:
        return UnavailableMeter(f"{prefer} needs a GPU")
    return _open_nvml(gpu, prefer)


def device_info(gpu) -> dict:
    """Name, UUID, driver version of a GPU and how it was matched to NVML, or {} when NVML cannot tell."""
    if pynvml is None:
        return {}
    try:
        nvml = _Nvml(gpu)
    except Exception:
        return {}
    try:
        return {"name": _text(pynvml.nvmlDeviceGetName(nvml.handle)), "uuid": nvml.uuid,
                "driver": _text(pynvml.nvmlSystemGetDriverVersion()), "nvml_match": nvml.how}
    except Exception:
        return {}
    finally:
        nvml.shutdown()
