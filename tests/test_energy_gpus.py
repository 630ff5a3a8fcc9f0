"""Which NVML device a rank meters, on a node with several GPUs (NVML stubbed, no GPU needed).

NVML numbers GPUs by PCI bus and ignores CUDA_VISIBLE_DEVICES; CUDA numbers only the visible
ones. With one visible GPU per rank every rank is CUDA device 0, so torch's index must never be
used as an NVML index: the rank's GPU is found by the UUID torch reports, else through its
CUDA_VISIBLE_DEVICES entry (an index or a GPU-/MIG- UUID, possibly a leading part of it).
"""
import pynvml
import pytest

from collafuse_mpi import energy, meters

UUIDS = ["GPU-aaaa0000-0000-0000-0000-000000000000", "GPU-bbbb1111-0000-0000-0000-000000000000",
         "GPU-cccc2222-0000-0000-0000-000000000000", "GPU-dddd3333-0000-0000-0000-000000000000"]
MIG = "MIG-eeee4444-0000-0000-0000-000000000000"  # an instance carved out of GPU 1


class FakeNode:
    """Four GPUs; GPU i's energy counter reads 1000 * (i + 1) mJ more at every call."""

    def __init__(self):
        self.calls = [0] * len(UUIDS)

    def install(self, monkeypatch):
        def by_uuid(u):
            if u == MIG:
                return ("mig", 1)
            if u not in UUIDS:
                raise pynvml.NVMLError_NotFound()
            return ("gpu", UUIDS.index(u))

        def by_index(i):
            if not 0 <= i < len(UUIDS):
                raise pynvml.NVMLError_InvalidArgument()
            return ("gpu", i)

        def total_energy(h):
            kind, i = h
            if kind == "mig":
                raise pynvml.NVMLError_NotSupported()
            self.calls[i] += 1
            return 1000 * (i + 1) * self.calls[i]

        for name, fn in {
            "nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
            "nvmlDeviceGetCount": lambda: len(UUIDS),
            "nvmlDeviceGetHandleByIndex": by_index, "nvmlDeviceGetHandleByUUID": by_uuid,
            "nvmlDeviceGetUUID": lambda h: MIG if h[0] == "mig" else UUIDS[h[1]].encode(),
            "nvmlDeviceIsMigDeviceHandle": lambda h: h[0] == "mig",
            "nvmlDeviceGetDeviceHandleFromMigDeviceHandle": lambda h: ("gpu", h[1]),
            "nvmlDeviceGetTotalEnergyConsumption": total_energy,
            "nvmlDeviceGetPowerUsage": lambda h: 100_000,
            "nvmlDeviceGetName": lambda h: "NVIDIA H100", "nvmlSystemGetDriverVersion": lambda: "550.54",
        }.items():
            monkeypatch.setattr(pynvml, name, fn)
        return self


@pytest.fixture
def node(monkeypatch):
    return FakeNode().install(monkeypatch)


def key(gpu) -> str:
    m = energy.open_meter(gpu)
    try:
        return m.device_key
    finally:
        m.close()


@pytest.mark.parametrize("visible, index, nvml", [
    ("2", 0, 2),                      # one GPU per rank (the job scripts' binding): CUDA 0 is NVML 2
    ("3,1", 1, 1),                    # the second visible one
    (UUIDS[3], 0, 3),                 # SLURM and some sites bind by UUID
    ("GPU-cccc", 0, 2),               # CUDA accepts a unique leading part of the UUID
    (" 1 , 0 ", 0, 1),                # white space around entries
    (None, 1, 1),                     # nothing hidden: CUDA index = NVML index
])
def test_visible_devices_pick_the_right_gpu(node, visible, index, nvml):
    assert key(energy.Gpu(index, "", visible)) == "gpu:" + UUIDS[nvml]


def test_uuid_from_torch_wins(node):
    # torch reports the bare UUID (no GPU- prefix); it decides even when the mask would mislead
    gpu = energy.Gpu(0, UUIDS[3][4:], "0")
    assert key(gpu) == "gpu:" + UUIDS[3]
    assert energy.device_info(gpu)["nvml_match"] == "uuid"


def test_one_gpu_per_rank_gives_each_rank_its_own_counter(node):
    """Four ranks, each sees one GPU as cuda:0: four device keys, each rank reads its GPU's
    counter (GPU i advances 1000 * (i + 1) mJ per read), so no energy drops out."""
    meters_ = [energy.open_meter(energy.gpu_of(0, "", {"CUDA_VISIBLE_DEVICES": str(r)})) for r in range(4)]
    assert [m.device_key for m in meters_] == ["gpu:" + u for u in UUIDS]
    assert energy.owners([m.device_key for m in meters_]) == [True] * 4
    for i, m in enumerate(meters_):
        assert m.read() == pytest.approx(1.0 * (i + 1))  # one more counter read: 1000 (i+1) mJ
        m.close()


def test_mig_instance_meters_its_whole_gpu(node):
    m = energy.open_meter(energy.Gpu(0, "", MIG))
    assert m.source == "nvml-energy" and m.device_key == "gpu:" + UUIDS[1]
    assert "MIG" in m.reason
    m.close()


def test_unmatched_device_is_unavailable_with_the_reason(node):
    m = energy.open_meter(energy.Gpu(1, "", "2"))  # CUDA device 1 but only one GPU visible
    assert m.source == "unavailable" and m.read() is None
    assert "CUDA_VISIBLE_DEVICES" in m.reason and "'2'" in m.reason
    m = energy.open_meter(energy.Gpu(0, "", "GPU-ffff"))
    assert m.source == "unavailable" and "GPU-ffff" in m.reason


def test_listing_names_device_match_and_meter(node, monkeypatch):
    monkeypatch.setattr(energy, "RAPL_ROOT", "/nonexistent")
    env = {"CUDA_VISIBLE_DEVICES": "3", "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    lines = meters.report(env, devices=[(0, "")])
    assert lines[0].startswith("[task 5@") and "CUDA_VISIBLE_DEVICES=3" in lines[0]
    assert "matched by CUDA_VISIBLE_DEVICES entry 0 = 3" in lines[1] and UUIDS[3] in lines[1]
    assert "nvml-energy gpu:" + UUIDS[3] in lines[1]
    assert "cpu -> unavailable (RAPL: no readable RAPL package domain under /nonexistent)" in lines[2]
