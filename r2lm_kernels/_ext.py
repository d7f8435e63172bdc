"""Loads the compiled extension, which registers torch.ops.r2lm.* (TORCH_LIBRARY) on import.

R2LM_LIBRARY=<path to _C*.so> loads a build from another folder (a developer's CMake build dir)
instead of the one installed beside this file.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re

import torch  # imported before the extension, which links against its libraries


_REBUILD = "rebuild it against the installed torch (pip install --no-build-isolation .)"


def _load():
    path = os.environ.get("R2LM_LIBRARY")
    try:
        return _import(path)
    except ImportError as error:
        message = str(error)
        if "undefined symbol" in message:
            raise ImportError(f"r2lm_kernels' compiled extension does not link with torch {torch.__version__}: it "
                              f"was built against another torch release; {_REBUILD}") from error
        missing = re.match(r"(lib(?:c10|torch)\w*\.so[.\d]*): cannot open shared object file", message)
        if missing:  # e.g. built with CUDA, loaded beside a CPU-only torch
            raise ImportError(f"r2lm_kernels' compiled extension needs {missing.group(1)}, which torch "
                              f"{torch.__version__} does not have (a torch build without CUDA?): it was built "
                              f"against another torch; {_REBUILD}") from error
        raise


def _import(path):
    if not path:
        try:
            return importlib.import_module("r2lm_kernels._C")
        except ModuleNotFoundError as error:
            if error.name != "r2lm_kernels._C":
                raise
            # Typically Python started in the repository root, where the source tree hides the installed package.
            raise ImportError(
                f"r2lm_kernels was imported from {os.path.dirname(os.path.abspath(__file__))}, which holds no "
                "compiled extension (_C): install the package (pip install --no-build-isolation .) and run "
                "Python from another folder than the repository root, or set R2LM_LIBRARY to a dev build's "
                "_C*.so") from error
    spec = importlib.util.spec_from_file_location("r2lm_kernels._C", path)
    if spec is None:
        raise ImportError(f"R2LM_LIBRARY={path!r} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_torch_release(module):
    """torch's C++ ABI changes between releases: an extension built against another one may crash or
    compute garbage even where it loads."""
    built = module.build_info()["torch"]
    running = ".".join(torch.__version__.split(".")[:2])
    if built != running:
        raise ImportError(f"r2lm_kernels' compiled extension ({module.__file__}) was built against torch {built}, "
                          f"but torch {torch.__version__} is installed: {_REBUILD}")


_C = _load()
_check_torch_release(_C)


def compiled_backends() -> dict:
    """Which kernel backends this build contains, e.g. {'cpu': True, 'cuda': True, 'cuda_archs': '80,90a'}."""
    return dict(_C.compiled_backends())


def cpu_vector_bytes() -> int:
    """Vector width in bytes of the portable CPU kernels on this CPU: 64 (AVX-512), 32 (AVX2 + FMA) or 16
    (other CPUs). R2LM_CPU_VECTOR_BYTES (64, 32 or 16) caps it (the tests use it to cover every width)."""
    return int(_C.cpu_vector_bytes())


def registered_ops() -> list[str]:
    """The op names registered under torch.ops.r2lm by this build."""
    return sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("r2lm::")})
