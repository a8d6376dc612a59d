"""The startup heap, frozen: moved out of the garbage collector's sight once a process is up.

An API process holds some 420,000 objects the collector tracks once it has imported
FastAPI, pydantic and transformers; a worker some 650,000 before its engine starts (torch,
vLLM). Python's full collection walks every one of them: about 200 ms in the API and
340 ms in a worker on these CPUs, the interpreter lock held throughout, and it comes
whenever enough objects have outlived the younger generations (a busy stream keeps
making such objects). In the worker that is a stall of every stream's tokens; in the API,
of every SSE write. `gc.freeze()` after start-up (as vLLM's own server does,
`freeze_gc_heap`) leaves the collector only what was made since: the imports, the
tokenizer and the engine live as long as the process anyway.
"""

from __future__ import annotations

import gc
import logging

from common.logs import log_event

log = logging.getLogger(__name__)


def freeze_startup_heap(process: str) -> int:
    """Collect once, then freeze what is left (it lives as long as the process); logs and
    returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log_event(log, "heap.frozen", process=process, objects=frozen)
    return frozen
