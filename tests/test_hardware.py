"""Host detection, on injected inputs so other machines can be tested here."""

from __future__ import annotations

from qwen_runner import hardware

SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx avx2 avx512f avx512_bf16 avx512_fp16 avx512_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: ignored second block
flags\t\t: fpu
"""


def test_parse_cpuinfo_reads_the_first_block():
    model, vendor, flags = hardware.parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert vendor == "GenuineIntel"
    assert {"amx_bf16", "avx512_fp16"} <= flags and "amx_fp16" not in flags


def test_detect_cpu_on_injected_text():
    cpu = hardware.detect_cpu(SAPPHIRE_RAPIDS)
    assert cpu.has("amx_bf16") and cpu.has("avx512_fp16") and not cpu.has("amx_fp16")
    assert set(cpu.isa) == set(hardware.ISA_FLAGS)
    assert 1 <= cpu.usable_cores <= cpu.logical_cores


def test_parse_cpulist():
    assert hardware.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert hardware.parse_cpulist("") == []


def test_numa_nodes_from_sysfs(tmp_path):
    for node, cpus in ((1, "4-7"), (0, "0-3")):
        (tmp_path / f"node{node}").mkdir()
        (tmp_path / f"node{node}" / "cpulist").write_text(cpus)
        (tmp_path / f"node{node}" / "meminfo").write_text(f"Node {node} MemTotal:  1048576 kB\n")
    nodes = hardware.read_numa_nodes(tmp_path)
    assert [n.node for n in nodes] == [0, 1]
    assert nodes[1].cpus == [4, 5, 6, 7] and nodes[0].memory_total == 1 << 30


def test_cgroup_v2_limit(tmp_path):
    (tmp_path / "memory.max").write_text("8589934592\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert hardware.cgroup_memory(tmp_path) == (8 << 30, 1 << 30)


def test_cgroup_v2_unlimited(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    assert hardware.cgroup_memory(tmp_path) == (None, None)


def test_cgroup_v1_huge_limit_means_unlimited(tmp_path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("100")
    assert hardware.cgroup_memory(tmp_path) == (None, None)


def test_usable_memory_is_capped_by_the_cgroup():
    mem = hardware.MemoryInfo(total=64 << 30, available=60 << 30, swap_total=0, swap_free=0,
                              cgroup_limit=16 << 30, cgroup_usage=4 << 30)
    assert mem.usable == 12 << 30
    free = hardware.MemoryInfo(64 << 30, 60 << 30, 0, 0, None, None)
    assert free.usable == 60 << 30
