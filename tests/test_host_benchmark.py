"""benchmarks/host.py runs end to end (a few calls a case, not a timing): every case reaches
bn_triton's launch layer (the stubs count its launches), the split cases take the split path,
and the per-launch cost below the wrappers is measured for the split kernels on both paths."""
from benchmarks import host


def test_every_case_reaches_the_stubbed_launches():
    rows = host.measure(number=3)
    assert [row["case"] for row in rows] == [case[0] for case in host.CASES]
    for row in rows:
        for mode in ("forward", "forward_backward"):
            assert row[mode]["launches"] >= 1 and row[mode]["bn_triton_us"] > 0, row
        split = " split" in row["case"]
        assert ("batch_stats_kernel" in row["forward"]["kernels"]) == split, row
        assert ("dy_sums_kernel" in row["forward_backward"]["kernels"]) == split, row


def test_launch_cost_times_both_paths():
    cost = host.launch_cost((4, 3, 128, 128))
    assert {"batch_stats_kernel", "normalize_kernel", "dy_sums_kernel",
            "input_grad_kernel"} <= set(cost)
    assert all(paths["triton"] > 0 and paths["direct"] > 0 for paths in cost.values())
