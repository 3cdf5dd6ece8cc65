"""Shared by every test folder: ``tests/`` is importable, so ``from tiny_models import ...`` works."""
