"""Fixtures for the io tests."""

import json

import pytest


@pytest.fixture
def write_json(tmp_path):
    """Write a JSON-able object (or raw text) to tmp_path/name and return the path."""

    def _write(name, content):
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    return _write
