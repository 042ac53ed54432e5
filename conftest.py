"""Root conftest: shared fixtures live in tests/fixtures_*.py, one module per owner."""

pytest_plugins = [
    "tests.fixtures_db",
    "tests.fixtures_speech",
    "tests.fixtures_pipeline",
    "tests.fixtures_web",
    "tests.fixtures_agents",
    "tests.fixtures_sip",
    "tests.fixtures_serve",
]
