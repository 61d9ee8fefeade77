import os
import sys
import tempfile
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Inductor's on-disk cache can replay code compiled against an older op implementation.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kvcompile-inductor-"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import kvcompile

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kvcompile.reset()
    yield
    torch._dynamo.reset()
