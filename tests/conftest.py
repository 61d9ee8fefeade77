import os
import sys
import tempfile

import torch  # does not import triton

# Without a GPU, Triton kernels run under the interpreter. Triton reads TRITON_INTERPRET when it is
# imported (torch._dynamo imports it), so this must come before anything imports torch._dynamo.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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
