"""Energy meters with NVML stubbed and a fake powercap tree; runs without a GPU."""
import time

import pynvml
import pytest

from collafuse_mpi import energy


class FakeNvml:
    """Stands in for the NVML functions energy.py calls; counters are set by the test."""

    def __init__(self, energy_mj=None, power_mw=None):
        self.energy_mj = energy_mj  # None: energy counter not supported
        self.power_mw = power_mw  # None: power reading not supported
        self.inits = 0
        self.shutdowns = 0

    def install(self, monkeypatch):
        def init():
            self.inits += 1

        def shutdown():
            self.shutdowns += 1

        def energy_fn(handle):
            assert handle == "h0"
            if self.energy_mj is None:
                raise pynvml.NVMLError_NotSupported()
            return self.energy_mj

        def power_fn(handle):
            if self.power_mw is None:
                raise pynvml.NVMLError_NotSupported()
            return self.power_mw

        monkeypatch.setattr(pynvml, "nvmlInit", init)
        monkeypatch.setattr(pynvml, "nvmlShutdown", shutdown)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: f"h{i}")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption", energy_fn)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", power_fn)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: b"GPU-1234")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: "NVIDIA H100")
        monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: b"550.54")
        return self


def test_nvml_energy_counter_deltas_in_joules(monkeypatch):
    fake = FakeNvml(energy_mj=5_000_000, power_mw=100_000).install(monkeypatch)
    meter = energy.open_meter(0)
    assert meter.source == "nvml-energy"
    assert meter.device_key == "gpu:GPU-1234"
    assert meter.update_period_s == pytest.approx(0.1)
    assert meter.read() == 0.0  # a real zero: nothing consumed since open
    fake.energy_mj += 2_500
    assert meter.read() == pytest.approx(2.5)
    fake.energy_mj += 1_000_000
    assert meter.read() == pytest.approx(1002.5)
    meter.close()
    meter.close()  # a second close must not release NVML twice
    assert fake.inits == fake.shutdowns == 1


def test_bad_gpu_index_releases_nvml(monkeypatch):
    fake = FakeNvml(energy_mj=0).install(monkeypatch)

    def no_such_gpu(i):
        raise pynvml.NVMLError_InvalidArgument()

    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", no_such_gpu)
    assert energy.open_meter(7).source == "unavailable"
    assert energy.device_info(7) == {}
    assert fake.inits == fake.shutdowns == 2


def test_falls_back_to_power_sampling(monkeypatch):
    monkeypatch.setattr(energy, "POWER_INTERVAL_S", 0.01)
    fake = FakeNvml(energy_mj=None, power_mw=150_000).install(monkeypatch)
    t0 = time.monotonic()
    meter = energy.open_meter(0)
    assert meter.source == "nvml-power"
    assert meter.device_key == "gpu:GPU-1234"
    assert "NotSupported" in meter.reason or "Not Supported" in meter.reason
    time.sleep(0.3)
    joules = meter.read()
    elapsed = time.monotonic() - t0
    meter.close()
    assert meter.samples >= 5  # the background thread really sampled
    # constant 150 W: the trapezoid rule is exact up to the gap between t0 and the first sample
    assert joules == pytest.approx(150.0 * elapsed, rel=0.05)
    assert fake.shutdowns == 1


def test_power_meter_trapezoid_with_fake_clock(monkeypatch):
    fake = FakeNvml(power_mw=100_000).install(monkeypatch)
    now = [0.0]
    meter = energy.NvmlPowerMeter(energy._Nvml(0), interval_s=3600.0, clock=lambda: now[0])
    fake.power_mw, now[0] = 200_000, 2.0
    assert meter.read() == pytest.approx(300.0)  # (100 + 200) / 2 W * 2 s
    fake.power_mw, now[0] = 0, 3.0
    assert meter.read() == pytest.approx(400.0)  # + (200 + 0) / 2 W * 1 s
    fake.power_mw = None  # the reading starts failing: the total can no longer be trusted
    assert meter.read() is None
    meter.close()


def test_forced_sources_and_nothing_supported(monkeypatch):
    fake = FakeNvml(energy_mj=None, power_mw=None).install(monkeypatch)
    meter = energy.open_meter(0)
    assert meter.source == "unavailable" and meter.read() is None and meter.device_key == ""
    assert fake.shutdowns == 1  # the NVML init of the failed attempt was released
    fake.energy_mj, fake.power_mw = 10, 1000
    assert energy.open_meter(0, prefer="nvml-power").source == "nvml-power"
    assert energy.open_meter(0, prefer="unavailable").read() is None
    assert energy.open_meter(None, prefer="nvml-energy").source == "unavailable"
    with pytest.raises(ValueError):
        energy.open_meter(0, prefer="bogus")


def test_nvml_init_failure_falls_back(monkeypatch):
    def broken_init():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", broken_init)
    meter = energy.open_meter(0)
    assert meter.source == "unavailable"
    assert meter.read() is None
    assert energy.device_info(0) == {}


def test_device_info(monkeypatch):
    fake = FakeNvml().install(monkeypatch)
    assert energy.device_info(3) == {"name": "NVIDIA H100", "uuid": "GPU-1234", "driver": "550.54",
                                     "nvml_match": "NVML index 3"}
    assert fake.inits == fake.shutdowns == 1


def make_rapl(root, packages, max_range=1_000_000):
    """Fake powercap tree: intel-rapl:N packages plus a dram sub-domain that must be ignored."""
    for i, uj in enumerate(packages):
        d = root / f"intel-rapl:{i}"
        d.mkdir()
        (d / "name").write_text(f"package-{i}\n")
        (d / "energy_uj").write_text(f"{uj}\n")
        (d / "max_energy_range_uj").write_text(f"{max_range}\n")
        sub = root / f"intel-rapl:{i}:0"
        sub.mkdir()
        (sub / "name").write_text("dram\n")
        (sub / "energy_uj").write_text("123456\n")
        (sub / "max_energy_range_uj").write_text(f"{max_range}\n")
    psys = root / "intel-rapl:9"
    psys.mkdir()
    (psys / "name").write_text("psys\n")
    (psys / "energy_uj").write_text("777\n")
    (psys / "max_energy_range_uj").write_text(f"{max_range}\n")


def set_uj(root, i, uj):
    (root / f"intel-rapl:{i}" / "energy_uj").write_text(f"{uj}\n")


def test_rapl_reads_and_wraps(tmp_path, monkeypatch):
    make_rapl(tmp_path, [100_000, 900_000])
    monkeypatch.setattr(energy, "RAPL_ROOT", str(tmp_path))
    meter = energy.open_meter(None)
    assert meter.source == "rapl"
    assert meter.device_key.endswith(":package-0,package-1")
    assert meter.device_key.startswith("cpu:")
    assert meter.read() == 0.0
    set_uj(tmp_path, 0, 600_000)  # +0.5 J
    set_uj(tmp_path, 1, 950_000)  # +0.05 J
    assert meter.read() == pytest.approx(0.55)
    set_uj(tmp_path, 1, 50_000)  # wrapped: 50_000 to the top, then 50_000 more
    assert meter.read() == pytest.approx(0.65)
    meter.close()


def test_rapl_unreadable_is_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "RAPL_ROOT", str(tmp_path / "missing"))
    meter = energy.open_meter(None)
    assert meter.source == "unavailable"
    assert meter.read() is None
    assert "RAPL" in meter.reason


def test_rapl_file_vanishing_reads_none(tmp_path):
    make_rapl(tmp_path, [0])
    meter = energy.RaplMeter(root=str(tmp_path), poll_s=0)
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()
    assert meter.read() is None


def test_counter_delta():
    assert energy.counter_delta(10, 25, 100) == 15
    assert energy.counter_delta(90, 5, 100) == 15
    assert energy.counter_delta(7, 7, 100) == 0
    assert energy.counter_delta(3, 8, None) == 5
    with pytest.raises(ValueError):
        energy.counter_delta(8, 3, None)


def test_owners():
    keys = ["gpu:A", "gpu:A", "gpu:B", "", "cpu:n1:package-0", "gpu:B", "cpu:n1:package-0", ""]
    assert energy.owners(keys) == [True, False, True, False, True, False, False, False]
    assert energy.owners([]) == []


def test_short_window():
    class M(energy.EnergyMeter):
        update_period_s = 0.1

    assert energy.short_window(0.15, M())
    assert not energy.short_window(0.25, M())


def test_unavailable_meter_is_none_not_zero():
    meter = energy.UnavailableMeter("test")
    assert meter.read() is None
    assert meter.source == "unavailable" and meter.device_key == ""
    meter.close()


def test_open_meter_on_this_machine_does_not_raise():
    for gpu in (None, 0):
        meter = energy.open_meter(gpu)
        assert meter.source in energy.SOURCES
        value = meter.read()
        if meter.source == "unavailable":
            assert value is None and meter.device_key == ""
        else:
            assert value is not None and value >= 0.0 and meter.device_key
        meter.close()
