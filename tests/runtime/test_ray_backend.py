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

import numpy as np
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


class _FakeRef:
    """An ObjectRef as RayWorker uses it: like Ray's, each `future()` is a new concurrent
    future of the one result, and awaiting the ref awaits another one."""

    def __init__(self) -> None:
        self.futures: list = []

    def future(self):  # noqa: ANN201 - concurrent.futures.Future
        import concurrent.futures

        self.futures.append(concurrent.futures.Future())
        return self.futures[-1]

    def set_result(self, value: object) -> None:
        for future in self.futures:
            if not future.done():
                future.set_result(value)

    def __await__(self):  # noqa: ANN204
        import asyncio

        return asyncio.wrap_future(self.future()).__await__()


class _FakeRay:
    """What RayWorker touches of the ray module."""

    class exceptions:  # noqa: N801 - mirrors ray.exceptions
        class RayError(Exception): ...

        class RayTaskError(RayError): ...

        class RayActorError(RayError): ...

    def __init__(self) -> None:
        self.cancelled: list[_FakeRef] = []
        self.killed: list[tuple[object, bool]] = []

    def cancel(self, ref: _FakeRef) -> None:
        self.cancelled.append(ref)  # asks only: the actor may keep running the call

    def kill(self, actor: object, no_restart: bool) -> None:
        self.killed.append((actor, no_restart))


@pytest.mark.asyncio
async def test_a_ray_actor_hung_in_a_cancelled_call_is_busy_and_killed_on_restart(
        tiny: TinyModel) -> None:
    import asyncio
    import types

    from runtime.ray_worker import RayWorker
    from runtime.worker import WorkerState

    fake = _FakeRay()
    refs: list[_FakeRef] = []

    def remote(*args: object) -> _FakeRef:
        refs.append(_FakeRef())
        return refs[-1]

    actor = types.SimpleNamespace(run=types.SimpleNamespace(remote=remote))
    config = server_config(tiny.bundle, workers_backend="ray", worker_deadline_ms=50.0)
    backend = types.SimpleNamespace(ray=fake, config=config)
    worker = RayWorker(backend, 0, 0)  # type: ignore[arg-type]
    worker._actor, worker.state = actor, WorkerState.READY  # noqa: SLF001 - as start() leaves it
    call = asyncio.create_task(worker.run("f", np.zeros((1, 1, 4, 4), np.float32)))
    await asyncio.sleep(0)
    call.cancel()  # its group was answered without it
    with pytest.raises(asyncio.CancelledError):
        await call
    assert fake.cancelled == refs  # ray.cancel asked ...
    await asyncio.sleep(0.06)
    assert worker.busy_s() > 0.05  # ... but the actor never ended the call
    await worker.stop()  # the pool replaces an overdue worker: its hung process is ended
    assert fake.killed == [(actor, False)]  # and Ray restarts it
    refs[0].set_result(None)
    assert worker.busy_s() == 0.0


@pytest.mark.asyncio
async def test_a_ray_worker_stopped_with_young_calls_leaves_its_actor(tiny: TinyModel) -> None:
    import types

    from runtime.ray_worker import RayWorker
    from runtime.worker import WorkerState

    fake = _FakeRay()
    ref = _FakeRef()
    actor = types.SimpleNamespace(run=types.SimpleNamespace(remote=lambda *a: ref))
    config = server_config(tiny.bundle, workers_backend="ray", worker_deadline_ms=60_000.0)
    worker = RayWorker(types.SimpleNamespace(ray=fake, config=config), 0, 0)  # type: ignore[arg-type]
    worker._actor, worker.state = actor, WorkerState.READY  # noqa: SLF001
    import asyncio

    call = asyncio.create_task(worker.run("f", np.zeros((1, 1, 4, 4), np.float32)))
    await asyncio.sleep(0)
    await worker.stop()  # shutdown: the call is young, the actor is not killed here
    assert fake.killed == []
    ref.set_result(np.ones(1))
    await asyncio.sleep(0)
    np.testing.assert_array_equal(await call, np.ones(1))
