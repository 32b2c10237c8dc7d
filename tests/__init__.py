"""The tests, a package: their helpers import as ``tests.helpers``, ``tests.references`` and ``tests.own_attention``
(the repository root is on ``sys.path`` through pytest's ``pythonpath`` setting in pyproject.toml)."""
