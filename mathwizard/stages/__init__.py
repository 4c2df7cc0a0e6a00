"""One module per pipeline stage: `STAGE`, `VERSION`, `expected_fingerprint(...)` and `run(...) -> Manifest`."""
