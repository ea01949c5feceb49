"""Machine info: JSON-safe and describes this process's CPUs."""

from __future__ import annotations

import json
import os

from bench.machine import machine_info, machine_label, usable_cpu_count


def test_machine_info_is_json_safe_and_consistent() -> None:
    info = json.loads(json.dumps(machine_info()))
    assert info["cpu_count_usable"] == len(os.sched_getaffinity(0)) == usable_cpu_count()
    assert info["cpu_count_usable"] <= info["cpu_count_host"]
    assert isinstance(info["gpus"], list) and info["cpu_model"]
    assert "numpy" in info["packages"] and info["packages"]["numpy"] is not None
    label = machine_label(info)
    assert f"{info['cpu_count_usable']} cores" in label
