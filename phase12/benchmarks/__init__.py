"""Benchmarks: each measures, returns a tidy DataFrame and (where long) writes its CSV as
it goes; the command line (`run.py bench NAME`) parses the flags, writes the tables and
has the analysis draw them. Nothing in the engine imports this package.

    step         median time and peak memory of one outer step (eager and CUDA graph)
    attention    the fused attention op against the reference ops and torch SDPA
    tiles        block-size sweep of the tiled attention kernels
    distributed  torchrun 1 vs P processes per meta-batch, a sweep on 1 vs P devices
"""
