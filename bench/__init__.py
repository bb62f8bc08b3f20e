"""qubes-mcp benchmarks: ``python -m bench [--quick] [--only NAME] [--json FILE]``.

Every ``bench/bench_<name>.py`` module that defines ``run(quick: bool) -> list[Result]`` is
one benchmark; the runner (``bench/__main__.py``) finds them, runs them in turn and prints one
table. Not part of the test suite: timings vary with the machine and its load.
"""
