"""Adapters for the private parts of the libraries mpbook builds on.

Every use of another library's private names (underscored attributes and modules, and
transformers' internal loading modules) lives in one module here, one per library
(ipyparallel, argparse, torch, transformers, and ipywidgets for the tests), with the versions
it was checked against and a ``verify()`` that the test suite runs: a new release that moves
one of them fails that test with a message naming what changed, instead of breaking mpbook
somewhere nobody would think to look. ``tests/test_structure.py`` finds any such use outside
this package.
"""
