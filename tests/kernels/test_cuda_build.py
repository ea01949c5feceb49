"""nvcc really compiles kernels/decoder.cu (skipped with a reason where nvcc is absent)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kernels import build
from kernels.build import BuildConfig
from kernels.errors import KernelBuildError

KERNEL_NAMES = (
    [f"ci_{kind}_{suffix}" for suffix in ("f32", "f16", "bf16") for kind in ("one_shot_decode", "online_update")]
    + [f"ci_general_decode_{s}_r{r}" for s in ("f32", "f16", "bf16") for r in (1, 2, 4, 8)]
    + ["ci_spin_wait"]
)


def _nvcc_or_skip() -> str:
    try:
        return build.find_nvcc()
    except KernelBuildError as exc:
        pytest.skip(f"nvcc is not installed here: {exc}")


def test_one_arch_compiles_caches_and_exports_every_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _nvcc_or_skip()
    config = BuildConfig(cache_dir=str(tmp_path), archs=("sm_80",), ptx_arch=None)
    path = build.build(config)
    assert path.parent == tmp_path and path.suffix == ".fatbin"
    assert build.fatbin_contents(path) == ["sm_80"]
    image = path.read_bytes()
    missing = [name for name in KERNEL_NAMES if name.encode() not in image]
    assert not missing, f"kernels missing from the fatbin: {missing}"
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"

    def no_compile(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached fatbin must not be rebuilt")

    monkeypatch.setattr(build.subprocess, "run", no_compile)
    build.tool_version.cache_clear()
    with pytest.raises(AssertionError, match="must not be rebuilt"):
        build.build(config)  # nvcc --version is part of the key, so it does run...
    monkeypatch.undo()
    assert build.build(config) == path  # ...but the compile does not (same key, same file)


def test_cache_key_follows_source_and_flags(tmp_path: Path) -> None:
    nvcc = _nvcc_or_skip()
    source = tmp_path / "decoder.cu"
    source.write_bytes(build.SOURCE.read_bytes())
    config = BuildConfig(cache_dir=str(tmp_path))
    key = build.cache_key(config, nvcc, source)
    assert build.cache_key(BuildConfig(cache_dir=str(tmp_path), verbose=True), nvcc, source) == key
    assert build.cache_key(BuildConfig(archs=("sm_90",)), nvcc, source) != key
    source.write_text(source.read_text() + "\n// edited\n")
    assert build.cache_key(config, nvcc, source) != key


def test_compile_errors_are_reported(tmp_path: Path) -> None:
    _nvcc_or_skip()
    broken = tmp_path / "broken.cu"
    broken.write_text('extern "C" __global__ void k() { undeclared_thing(); }\n')
    config = BuildConfig(cache_dir=str(tmp_path), archs=("sm_80",), ptx_arch=None)
    with pytest.raises(KernelBuildError, match=r"(?s)nvcc failed with exit code \d+.*undeclared_thing"):
        build.build(config, source=broken)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.fatbin"))


def test_missing_nvcc_names_the_fixes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("NVCC", raising=False)
    monkeypatch.setattr(build, "_NVCC_FALLBACKS", ("/nonexistent/nvcc",))
    with pytest.raises(KernelBuildError, match=r"nvcc not found .*--nvcc PATH"):
        build.find_nvcc()
    with pytest.raises(KernelBuildError, match=r"nvcc not found \(looked for /no/such/nvcc\)"):
        build.build(BuildConfig(nvcc="/no/such/nvcc"))
    assert build.main(["--nvcc", "/no/such/nvcc"]) == 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="expected names like 'sm_90', got '90'"):
        BuildConfig(archs=("90",))
    with pytest.raises(ValueError, match="at least one target"):
        BuildConfig(archs=())
    with pytest.raises(ValueError, match=r"BuildConfig: unknown key\(s\) \['arch'\]"):
        BuildConfig.from_dict({"arch": "sm_90"})
    assert BuildConfig(archs=("sm_90a",)).archs == ("sm_90a",)


def test_param_struct_layout_matches_the_host_packing() -> None:
    """decoder.cu pins its parameter structs with static_asserts; the host must pack the same."""
    from kernels import cuda_params

    source = build.SOURCE.read_text()
    sizes = dict(re.findall(r"static_assert\(sizeof\((\w+)\) == (\d+)", source))
    assert {name: int(size) for name, size in sizes.items()} == {
        "OneShotParams": cuda_params.ONE_SHOT_PARAMS.size,
        "OnlineUpdateParams": cuda_params.ONLINE_UPDATE_PARAMS.size,
        "GeneralParams": cuda_params.GENERAL_PARAMS_SIZE,
    }


@pytest.mark.slow
def test_full_build_has_every_arch_and_ptx(tmp_path: Path) -> None:
    _nvcc_or_skip()
    path = build.build(BuildConfig(cache_dir=str(tmp_path)))
    image = path.read_bytes()
    assert all(name.encode() in image for name in KERNEL_NAMES)
    assert sorted(build.fatbin_contents(path)) == ["compute_90", "sm_80", "sm_86", "sm_89", "sm_90"]


def test_fatbin_contents_rejects_other_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.fatbin"
    junk.write_bytes(b"\x7fELF" + bytes(60))
    with pytest.raises(KernelBuildError, match="is not a fatbin: magic 0x464c457f"):
        build.fatbin_contents(junk)
