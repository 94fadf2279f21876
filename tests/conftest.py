"""Test-suite settings. Under CI (``$CI`` set, as ``.ci/run`` runs it) the hypothesis sweeps are
derandomized: each property is tried on the same examples on every run, so a CI result depends
on the commit only. Locally they draw fresh examples each run (and replay any failure hypothesis
has stored), which is where new counterexamples are found."""
import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
