"""The backend and config resolution every pallas_kernels entry shares (_common.implementation),
and assume_platform, the way lowering checks pick a platform."""

import dataclasses

import pytest

import pallas_kernels
from pallas_kernels import _common


@dataclasses.dataclass(frozen=True)
class _Gpu:
    tile: int = 8


@dataclasses.dataclass(frozen=True)
class _Tpu:
    tile: int = 128


def _reference(x):
    return ("reference", x)


def _gpu(x, *, config, interpret):
    return ("gpu", x, config, interpret)


def _tpu(x, *, config, interpret):
    return ("tpu", x, config, interpret)


def _run(backend, config=None, tpu=True):
    kernels = dict(gpu=(_gpu, _Gpu()), tpu=(_tpu, _Tpu()) if tpu else None)
    return _common.implementation(backend, config, reference=_reference, **kernels)(1)


@pytest.mark.parametrize(
    "platform,backend,want",
    [
        ("cpu", "auto", ("reference", 1)),
        ("cpu", "reference", ("reference", 1)),
        ("cpu", "pallas", ("gpu", 1, _Gpu(), True)),
        ("cpu", "pallas_tpu", ("tpu", 1, _Tpu(), True)),
        ("gpu", "auto", ("gpu", 1, _Gpu(), False)),
        ("gpu", "pallas", ("gpu", 1, _Gpu(), False)),
        ("gpu", "pallas_tpu", ("tpu", 1, _Tpu(), True)),
        ("tpu", "auto", ("tpu", 1, _Tpu(), False)),
        ("tpu", "pallas_gpu", ("gpu", 1, _Gpu(), True)),
    ],
)
def test_backend_resolution_per_platform(platform, backend, want):
    with pallas_kernels.assume_platform(platform):
        assert _run(backend) == want


def test_config_of_the_running_kernel_is_passed():
    with pallas_kernels.assume_platform("gpu"):
        assert _run("auto", _Gpu(tile=16)) == ("gpu", 1, _Gpu(tile=16), False)
        # The reference ignores either kind.
        assert _run("reference", _Tpu(tile=256)) == ("reference", 1)


def test_config_of_the_other_kind_or_of_no_kind_is_refused():
    with pytest.raises(ValueError, match="config is a _Tpu, but backend='pallas' runs the GPU"):
        _run("pallas", _Tpu())
    with pytest.raises(ValueError, match="config must be None or a _Gpu or _Tpu, got dict"):
        _run("reference", {"tile": 8})
    with pytest.raises(ValueError, match="backend must be one of"):
        _run("triton")


def test_an_op_without_a_tpu_kernel_runs_its_reference_there():
    with pallas_kernels.assume_platform("tpu"):
        assert _run("auto", tpu=False) == ("reference", 1)
        assert _run("pallas_tpu", _Gpu(), tpu=False) == ("reference", 1)
    with pytest.raises(ValueError, match="config must be None or a _Gpu, got _Tpu"):
        _run("auto", _Tpu(), tpu=False)


def test_assume_platform_nests_restores_and_checks_its_argument():
    outer = _common.platform()
    with pallas_kernels.assume_platform("tpu"):
        with pallas_kernels.assume_platform("gpu"):
            assert _common.platform() == "gpu"
        assert _common.platform() == "tpu"
    assert _common.platform() == outer
    with pytest.raises(ValueError, match="name must be one of"):
        with pallas_kernels.assume_platform("cuda"):
            pass
