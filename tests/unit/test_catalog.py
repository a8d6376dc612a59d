"""The API's tokenizer loading: first use from several threads at once (the warm-up and
the first requests after a start) must not fail."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import threading
from api.catalog import auto_tokenizer
errors = []
def load():
    try:
        auto_tokenizer()
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print(len(errors), errors[:1])
"""


def test_first_tokenizer_import_from_many_threads_at_once():
    # A fresh interpreter: transformers must not be imported yet. Without the lock in
    # api.catalog, 6 or 7 of 8 threads got "cannot import name 'AutoTokenizer'".
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[0] == "0", out.stdout
