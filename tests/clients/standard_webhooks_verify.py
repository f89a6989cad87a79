"""Verifies deliveries with the Standard Webhooks reference library for Python (PyPI
`standardwebhooks`, by the specification's authors), as a receiver using it would: reads a JSON
array of {secret, body, headers} on stdin and prints a JSON array holding, for each, "ok" or
the library's reason for refusing it.

Run by tests/tests/delivery.rs with target/deploy-tools' Python, where scripts/browser-setup
installs the library."""
import json
import sys

from standardwebhooks.webhooks import Webhook

verdicts = []
for check in json.load(sys.stdin):
    try:
        Webhook(check["secret"]).verify(check["body"].encode(), check["headers"])
        verdicts.append("ok")
    except Exception as e:  # the library's refusals, reported for the test to compare
        verdicts.append(f"{type(e).__name__}: {e}")
json.dump(verdicts, sys.stdout)
