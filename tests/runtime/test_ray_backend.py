"""`--workers-backend ray`: its options, and the Ray tier (ray_tier.py) run where Ray may
run here, inside a private network namespace with only loopback up (Ray binds to the
machine's own non-loopback address otherwise, and test traffic must stay on loopback)."""

from __future__ import annotations

import builtins
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_harness import TinyModel, server_config

from runtime.config import ServerConfig
from runtime.errors import ConfigError, EngineUnavailable

REPO = Path(__file__).resolve().parents[2]
TIER = Path(__file__).with_name("ray_tier.py")
TIER_TIMEOUT_S = 600


def namespace_reason() -> str | None:
    """Why no private network namespace can be made here (None: it can)."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux / iproute2)"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode:
        return (f"cannot make a private network namespace here (unshare -n: "
                f"{probe.stderr.strip() or probe.returncode})")
    return None


def in_namespace(*argv: str) -> list[str]:
    """argv run in a fresh network namespace with only loopback up."""
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


def test_the_ray_tier_passes_in_a_private_network_namespace() -> None:
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install -e '.[dist]'")
    if (reason := namespace_reason()) is not None:
        pytest.skip(reason)
    run = subprocess.run(in_namespace(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      str(TIER)),
                         cwd=REPO, capture_output=True, text=True, timeout=TIER_TIMEOUT_S)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


def test_ray_options_need_the_ray_backend(tiny: TinyModel) -> None:
    with pytest.raises(ConfigError, match=r"--ray-address, --ray-num-gpus need\(s\) "
                                          "--workers-backend ray"):
        server_config(tiny.bundle, ray_address="10.0.0.1:6379", ray_num_gpus=1.0)
    config = server_config(tiny.bundle, workers_backend="ray", ray_address="auto",
                           ray_num_cpus=2.0, ray_num_gpus=1.0)
    assert config.ray_address == "auto" and config.ray_num_gpus == 1.0


@pytest.mark.parametrize(("options", "message"), [
    ({"ray_num_cpus": -1.0}, "--ray-num-cpus must be a finite number >= 0"),
    ({"ray_num_gpus": float("inf")}, "--ray-num-gpus must be a finite number >= 0"),
    ({"ray_num_cpus": 0.0}, "--ray-num-cpus 0 needs --ray-num-gpus > 0"),
    ({"ray_max_restarts": -2}, "--ray-max-restarts must be -1"),
    ({"ray_start_timeout_s": 0.0}, "--ray-start-timeout-s must be > 0"),
])
def test_bad_ray_options_are_named(tiny: TinyModel, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_dict({"bundle": str(tiny.bundle), "workers_backend": "ray", **options})


def test_without_ray_the_backend_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime import ray_worker

    real_import = builtins.__import__

    def no_ray(name: str, *args: object, **kwargs: object) -> object:
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(EngineUnavailable, match=r"--workers-backend ray needs Ray: pip install"):
        ray_worker.import_ray()
