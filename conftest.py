"""Root conftest: shared fixtures live in tests/fixtures_*.py, one module per owner."""

pytest_plugins = [
    "tests.fixtures_db",
    "tests.fixtures_speech",
]
