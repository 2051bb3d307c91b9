# Test-only: put this folder first on PYTHONPATH to record a subprocess's AWS calls (tests/aws_calls.py).
import os

if os.environ.get("TEST_RECORD_AWS_CALLS"):
    from tests.aws_calls import install

    install(os.environ["TEST_RECORD_AWS_CALLS"])
