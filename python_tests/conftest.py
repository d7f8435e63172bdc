"""Shared test configuration: devices, the per-dtype tolerance table, and input helpers."""
import os

import pytest
import torch

# Relative-norm tolerance of a kernel against the reference, per input dtype (DESIGN.md section 4).
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_report_header(config):
    import r2lm_kernels
    return f"r2lm_kernels backends: {r2lm_kernels.compiled_backends()}; test devices: {DEVICES}"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def rel_err():
    """‖a − b‖ / ‖b‖ in float64."""
    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).norm() / b.norm().clamp_min(1e-300))
    return rel


@pytest.fixture
def tol():
    return TOLERANCE


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A fresh random seed for every test, printed so a failure can be replayed (R2LM_TEST_SEED=...)."""
    seed = int(os.environ.get("R2LM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(("random seed", f"replay with R2LM_TEST_SEED={value}"))
