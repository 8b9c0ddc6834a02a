"""Test doubles that are real: servers on 127.0.0.1 that the tests and benchmarks talk HTTP to."""
