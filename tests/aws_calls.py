"""Records every AWS API call a process makes (botocore event hooks), for the IAM tests.

    install("/tmp/calls.jsonl")     # in-process (the launcher's calls)
    PYTHONPATH=tests/iam/shim:$PWD TEST_RECORD_AWS_CALLS=/tmp/calls.jsonl python -m entrypoints.train   # the job's

One JSON line per call: the service, the operation, the region, the request parameters that decide which IAM action,
resource and condition keys AWS authorizes it against (never bodies), and the HTTP status and error code of the
answer. tests/iam_model.py turns these into IAM requests. Test code only: nothing in the product imports it.
"""

from __future__ import annotations

import json
import threading

# Request parameters that name the resource or carry a condition key; everything else (bodies, streams) is left out.
KEPT = ("Bucket", "Key", "Prefix", "Delimiter", "IfNoneMatch", "IfMatch", "SecretId", "TrainingJobName", "RoleArn",
        "Tags", "Name", "Target", "logGroupName", "logStreamName", "logStreamNamePrefix", "CheckpointConfig",
        "InputDataConfig", "OutputDataConfig", "AlgorithmSpecification", "ResourceConfig", "CopySource")
_lock = threading.Lock()


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def install(path: str) -> None:
    """Record the calls of every botocore session created from now on (and of the default one) into `path`."""
    import botocore.session

    def before(params, model, context, **_):
        context["qlora_call"] = {
            "service": model.service_model.service_name, "operation": model.name,
            "region": context.get("client_region"), "params": _plain({k: params[k] for k in KEPT if k in params})}

    def write(call: dict) -> None:
        with _lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(call) + "\n")

    def after(http_response, parsed, model, context, **_):
        call = context.pop("qlora_call", None)
        if call is not None:
            write({**call, "status": http_response.status_code, "error": (parsed or {}).get("Error", {}).get("Code", "")})

    def failed(exception, context, **_):
        call = context.pop("qlora_call", None)
        if call is not None:
            write({**call, "status": 0, "error": type(exception).__name__})

    def register(session) -> None:
        session.register("provide-client-params.*.*", before, unique_id="qlora-test-record-before")
        session.register("after-call.*.*", after, unique_id="qlora-test-record-after")
        session.register("after-call-error.*.*", failed, unique_id="qlora-test-record-error")

    original_init = botocore.session.Session.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        register(self)

    if not getattr(botocore.session.Session.__init__, "qlora_recording", False):
        init.qlora_recording = True
        botocore.session.Session.__init__ = init


def read(path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
