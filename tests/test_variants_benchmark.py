"""benchmarks.variants: Batch Renormalization and ghost batch norm make batch norm's launches
(ghost: plus one each way across the runs) and request its bytes, within the per-channel
extras the benchmark allows, on the slab and the split path, NCHW and channels_last."""
from benchmarks import variants


def test_variants_make_batch_norms_launches_and_bytes():
    rows = variants.measure()
    comparison = variants.compare(rows)
    assert len(comparison) == 2 * 2 * len(variants.CASES)  # two variants, two phases
    for row in comparison:
        assert row["same_kernels"] and row["ok"], row
    kernels = {kernel for row in rows for phase in ("forward", "backward")
               for kernel in row[phase]["kernels"]}
    assert {"forward_slab_kernel", "backward_slab_kernel", "batch_stats_kernel",
            "normalize_kernel", "dy_sums_kernel", "input_grad_kernel",
            "ghost_running_update_kernel", "sum_runs_kernel"} <= kernels
    ghost = [row for row in rows if row["layer"] == "GhostBatchNorm2d"]
    assert all(row["runs"] > 1 for row in ghost)
    # Renorm's and batch norm's bytes per element agree to 1%; ghost's to 2% on these sizes.
    by_case = {(row["case"], row["layer"]): row["bytes_per_element"] for row in rows}
    for (case, layer), per_element in by_case.items():
        for phase, value in per_element.items():
            base = by_case[(case, "BatchNorm2d")][phase]
            assert abs(value - base) <= (0.02 if layer.startswith("Ghost") else 0.01) * base
