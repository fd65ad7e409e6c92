"""What the agent registers: hardware detection, labels, InferenceNode spec/status (pure).

The create/patch calls against a real API server are tested in tests/integration/.
"""

from __future__ import annotations

import platform
from datetime import UTC, datetime

import pytest

from mlxpool.agent.node import hardware
from mlxpool.agent.node.nodeinfo import (
    check_node_name,
    default_node_name,
    node_object,
    node_spec,
    node_status,
    parse_labels,
)
from mlxpool.nodes import Hardware, LoadedModel, NodeStatus

CPUINFO_X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
flags\t\t: fpu vme
"""
CPUINFO_ARM = "processor\t: 0\nBogoMIPS\t: 48.00\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"
VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               10000.
Pages active:                            500000.
Pages inactive:                           20000.
Pages speculative:                         3000.
"""


def test_cpuinfo_chip_names():
    assert hardware.parse_cpuinfo_chip(CPUINFO_X86) == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert hardware.parse_cpuinfo_chip(CPUINFO_ARM) == "Raspberry Pi 4 Model B Rev 1.4"
    assert hardware.parse_cpuinfo_chip("processor : 0\n") is None


def test_free_memory_parsers():
    assert hardware.parse_meminfo_available(MEMINFO) == 20000000 * 1024
    assert hardware.parse_meminfo_available("MemTotal: 1 kB\n") is None
    assert hardware.parse_vm_stat_free(VM_STAT) == (10000 + 20000 + 3000) * 16384
    assert hardware.parse_vm_stat_free("garbage") is None


@pytest.mark.parametrize(("system", "machine", "tag", "accelerator"), [
    ("Darwin", "arm64", "darwin-arm64", "metal"),
    ("Darwin", "x86_64", "darwin-x86_64", "cpu"),
    ("Linux", "x86_64", "linux-x86_64", "cpu"),
    ("Linux", "aarch64", "linux-arm64", "cpu"),
])
def test_platform_and_accelerator(system, machine, tag, accelerator):
    assert hardware.platform_tag(system, machine) == tag
    assert hardware.accelerator_for(tag) == accelerator


def test_detect_hardware_on_this_host():
    hw = hardware.detect_hardware()
    assert hw.platform == hardware.platform_tag(platform.system(), platform.machine())
    assert hw.memory_bytes > 256 * 2**20
    assert hw.cpu_cores >= 1
    assert hw.chip
    free = hardware.free_memory_bytes()
    assert free is not None and 0 < free <= hw.memory_bytes


def test_labels_parse_and_reject_bad_syntax():
    assert parse_labels(["mlxpool.dev/pool=chat", "tier=", "zone=eu-1"]) == {
        "mlxpool.dev/pool": "chat", "tier": "", "zone": "eu-1",
    }
    for bad, needle in [("novalue", "key=value"), ("a b=c", "name"), ("Bad_Prefix!/x=y", "prefix"),
                        ("k=" + "v" * 64, "value")]:
        with pytest.raises(ValueError, match=needle):
            parse_labels([bad])


def test_node_names():
    assert default_node_name("Mac-Studio_7.local") == "mac-studio-7.local"
    assert default_node_name("___") == "agent"
    assert check_node_name("mac-1") == "mac-1"
    with pytest.raises(ValueError, match="DNS subdomain"):
        check_node_name("Mac_1")


def test_spec_and_object_are_camel_case_wire_shapes():
    hw = Hardware(chip="Apple M2 Ultra", memory_bytes=192 * 2**30, cpu_cores=24, accelerator="metal",
                  platform="darwin-arm64")
    body = node_object("mac-1", {"mlxpool.dev/pool": "chat"}, node_spec("http://10.0.0.5:8100", hw))
    assert body["apiVersion"] == "mlxpool.dev/v1alpha1"
    assert body["kind"] == "InferenceNode"
    assert body["metadata"] == {"name": "mac-1", "labels": {"mlxpool.dev/pool": "chat"}}
    assert body["spec"] == {
        "endpoint": "http://10.0.0.5:8100",
        "hardware": {"chip": "Apple M2 Ultra", "memoryBytes": 192 * 2**30, "cpuCores": 24,
                     "accelerator": "metal", "platform": "darwin-arm64", "memory": "192.0 GiB"},
        "maxModels": 1,
    }


def test_status_reports_models_heartbeat_and_version():
    now = datetime(2025, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)
    status = node_status(True, [LoadedModel(name="tiny", path="/m/tiny", memory_bytes=4096)], 2**30, now)
    wire = status.to_wire()
    assert wire["ready"] is True
    assert wire["models"] == [{"name": "tiny", "path": "/m/tiny", "memoryBytes": 4096}]
    assert wire["heartbeatTime"] == "2025-01-02T03:04:05Z"
    assert wire["freeMemoryBytes"] == 2**30 and wire["freeMemory"] == "1.0 GiB"
    assert wire["agentVersion"]
    assert NodeStatus.model_validate(wire) == status  # round-trips through the shared contract


def test_status_without_free_memory_omits_the_field():
    wire = node_status(False, [], None).to_wire()
    assert wire["ready"] is False and wire["models"] == []
    assert "freeMemoryBytes" not in wire and "freeMemory" not in wire


def test_device_info_of_each_backend_becomes_the_accelerator():
    from mlxpool.agent.engine.device import accelerator, parse_device_info
    from mlxpool.agent.engine.interface import AcceleratorKind

    cuda = parse_device_info(AcceleratorKind.CUDA, {"device_name": "NVIDIA H200", "total_memory": 150 << 30})
    assert (cuda.device_name, cuda.memory_bytes, cuda.discrete) == ("NVIDIA H200", 150 << 30, True)
    metal = parse_device_info(AcceleratorKind.METAL, {"device_name": "Apple M2 Ultra", "memory_size": 192 << 30})
    assert (metal.memory_bytes, metal.discrete) == (192 << 30, False)
    cpu = parse_device_info(AcceleratorKind.CPU, {"device_name": "AMD EPYC", "architecture": "x86_64"})
    assert (cpu.device_name, cpu.memory_bytes) == ("AMD EPYC", None)
    here = accelerator()  # this machine, as MLX reports it: the CPU backend in CI
    assert here.kind is AcceleratorKind.CPU and here.memory_bytes is None


def test_hardware_carries_the_accelerator_it_is_given():
    hw = hardware.detect_hardware("cuda", "NVIDIA H200", 150 << 30)
    assert (hw.accelerator, hw.device_name, hw.device_memory_bytes) == ("cuda", "NVIDIA H200", 150 << 30)
    assert hardware.device_free_bytes(10, 4) == 6 and hardware.device_free_bytes(4, 10) == 0
