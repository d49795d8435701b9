"""The harness tests (issue 11): the public API, the pytest plugin, ``ccidemu lab``, the
docs' examples and the installed wheel.  ``sample_project/`` is a third-party project's test
suite, run by tests/harness/test_wheel.py with the wheel's plugin: not collected here."""

collect_ignore = ["sample_project"]
