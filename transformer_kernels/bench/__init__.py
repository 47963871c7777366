"""The benchmarks: one ``bench_<op>.py`` per op (each also runs alone:
``python -m transformer_kernels.bench.bench_<op> -h``), the suite that runs them all (``suite.py``,
behind ``python -m transformer_kernels bench``), their shared methodology and harness
(``common.py``), the plots (``plots.py``), the results README's generator (``results_readme.py``)
and the head of the GPU check's summary (``gpu_summary.py``). Results go to ``benchmarks/results/``
of the repository."""
