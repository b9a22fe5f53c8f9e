"""kdfast's benchmark suite: ``python -m kdfast.bench`` (see ``--help``).

Cases live in :mod:`kdfast.bench.cases`; each measurement runs in a fresh process
(:mod:`kdfast.bench.harness`) so peak-memory figures are not polluted by earlier runs.
"""
