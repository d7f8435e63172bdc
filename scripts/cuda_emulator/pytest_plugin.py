"""pytest plugin for the test suite against the emulated build (_C_emu), where CPU tensors run the CUDA kernels.

The CUDA kernels have no float64: tests that pick float64 on CPU (for exactness) get float32, as they do on
CUDA. Variants that only choose between CPU kernels repeat each other and run once; tests of CPU-only
behaviour are left out, with the reason.
"""
import torch

# fixture params that select a CPU kernel or vector width, and the one value kept
CPU_VARIANTS = {"cpu_kernel": "auto", "vector_width": "widest"}

CPU_ONLY = {
    "test_tile_unit_kernel_runs_where_the_cpu_has_it": "the choice between the CPU kernels",
    "test_bad_values_raise": "the CPU layer reads cache_seqlens / block_table; CUDA clamps instead",
    "test_cuda_kernels_built_where_nvcc_exists": "the emulated build is a CPU build",
    "test_gradcheck": "gradcheck runs in float64",
    "test_kernels_path_gradients_match_reference": "compares float64 gradients",
    "test_matches_conv1d_composition": "compares in float64",
    "test_cpu_vector_bytes_and_its_cap": "the CPU kernels' vector widths",
    "test_cpu_kernels_follow_torch_thread_count": "the CPU kernels' OpenMP teams",
    "test_failed_allocation_in_a_cpu_kernel_raises": "the CPU kernels' per-thread buffers",
}
# Model and generation tests on a float64 model (tiny_model's default, for bitwise-stable decisions).
CPU_ONLY.update(dict.fromkeys([
    "test_cache_free_recompute_generates_the_same", "test_decoding_runs_only_the_new_positions",
    "test_kernels_and_reference_generate_the_same", "test_batch_independence",
    "test_fixed_tokens_per_step_statistics", "test_autoregressive_baseline_matches_naive_loop",
    "test_autoregressive_eos_and_sampling", "test_sidecar_is_block_local_and_sees_right_context",
    "test_block_mode_equals_full_forward", "test_right_padding_is_hidden_from_real_positions",
    "test_autoregressive_step_info", "test_compiled_block_step_writes_each_layers_cache",
    "test_bidirectional_block_mode_equals_full_forward_of_one_layer", "test_compiled_network_generates_the_same"],
    "runs a float64 model"))


def _float32_on_cpu(original):
    def pick(*args, **kwargs):
        dtype = original(*args, **kwargs)
        if isinstance(dtype, list):
            return [d for d in dtype if d is not torch.float64]
        return torch.float32 if dtype is torch.float64 else dtype
    return pick


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    patched = set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = item.originalname if hasattr(item, "originalname") else item.name
        repeated = any(params.get(k, v) != v for k, v in CPU_VARIANTS.items())
        float64 = any(v is torch.float64 for v in params.values())
        (drop if repeated or float64 or name in CPU_ONLY else keep).append(item)
        module = getattr(item, "module", None)
        for helper in ("dtypes_for", "device_dtype"):  # the tests' float64-on-CPU choices
            if module is not None and hasattr(module, helper) and (module, helper) not in patched:
                setattr(module, helper, _float32_on_cpu(getattr(module, helper)))
                patched.add((module, helper))
    config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_report_header(config):
    return f"CUDA kernels on the warp emulator (scripts/cuda_emulator): CPU tensors run them; " \
        f"{len(CPU_ONLY)} CPU-only tests left out (see the plugin)"
