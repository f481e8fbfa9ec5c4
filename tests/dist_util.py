"""Moved to tests/helpers.py; kept until every caller imports `run_distributed` from there."""
from helpers import run_distributed  # noqa: F401
