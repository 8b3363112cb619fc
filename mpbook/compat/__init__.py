"""Adapters for the private parts of the libraries mpbook builds on.

Every use of an underscored name of ipyparallel, argparse or torch lives in one module here,
with the versions it was checked against and a ``verify()`` that the test suite runs: a new
release that moves one of them fails that test with a message naming what changed, instead
of breaking mpbook somewhere nobody would think to look.
"""
