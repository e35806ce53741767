"""Shared test set-up.

Child processes (`python -m pipower ...`, `python -c ...`) must import the pipower the tests are
testing, the installed one with its compiled extension, not the source tree that `pytest tests` is run
from: Python puts the current folder first on a child's sys.path unless PYTHONSAFEPATH is set (3.11+).
Tests that start children also pass them a neutral working folder (helpers_models.CHILD_CWD) for older
Pythons.
"""
import os

os.environ.setdefault("PYTHONSAFEPATH", "1")
