"""Benchmarks: training throughput (`throughput`), the merge's memory (`merge_memory`), data preparation (`data_prep`)."""
