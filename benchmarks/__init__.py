"""The benchmarks: one ``bench_<op>.py`` per op (each also a script), the suite that runs them all
(``suite.py``, behind ``python -m transformer_kernels bench``), their shared methodology
(``common.py``), the plots (``plots.py``) and the results README's generator (``results_readme.py``)."""
