"""The reliability suite's table: what was tried and what held, rewritten by every run of
the tests without -m or -k into tests/reliability/README.md.

A module joins the table by marking its tests `reliability`; its row is the first line of
the module's docstring, its cases the module's tests."""
