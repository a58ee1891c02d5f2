"""Test setup: Triton runs in its CPU interpreter where there is no GPU.

TRITON_INTERPRET must be set before Triton decorates the kernels, so it is set here,
before any test module imports `kernels`.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # Decorate the kernels now, in interpreter mode, whatever the test order: tests that
    # set TRITON_INTERPRET=0 to check the error must not be the first to import them.
    import kernels.launch  # noqa: F401
    import phase12.fused_step.launch  # noqa: F401

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def bytecode_cached(monkeypatch):
    """Commands say only what the tests expect, on an interpreter that caches no bytecode
    too (the GPU machine's): the note about that (phase12.cli) is tested on its own."""
    from phase12 import cli

    monkeypatch.setattr(cli, "lacks_bytecode", lambda module: False)


@pytest.fixture
def interpreter():
    """Tests that run Triton kernels on the CPU need the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton CPU tests need TRITON_INTERPRET=1")


# launch.EXAMPLE_KERNELS_MAX set so that every call takes one kernel set of triton_step.
KERNEL_SETS = {"example": 10**9, "task": 0}


@pytest.fixture(params=KERNEL_SETS)
def kernel_set(request, monkeypatch):
    """Runs a test with each of triton_step's kernel sets: one program per example, and
    one per task."""
    from phase12.fused_step import launch

    monkeypatch.setattr(launch, "EXAMPLE_KERNELS_MAX", KERNEL_SETS[request.param])
    return request.param
