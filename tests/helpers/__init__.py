"""Helpers shared by the tests (imported as ``tests.helpers``; test files never import each other)."""
