import os
import sys
import tempfile

import torch  # does not import triton

# Without a GPU, Triton kernels run under the interpreter (with one, the kernel tests run the real
# kernels). Triton reads TRITON_INTERPRET when it is imported (torch._dynamo imports it), so this must
# come before anything imports torch._dynamo.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))  # the example decoders

# The suite runs the ops' torch reference unless a test asks for other kernels (monkeypatch.setenv): the
# CPU's default, the compiled decode attention (kernels/cpu.py), compiles C++ for every pair of layouts a
# call meets, minutes over the suite's hundreds of configurations. Its own tests set KVCOMPILE_KERNELS
# themselves (test_kernels.py, test_backend.py).
os.environ.setdefault("KVCOMPILE_KERNELS", "torch")

# Inductor's on-disk cache can replay code compiled against an older op implementation.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="kvcompile-inductor-"))

# Hypothesis profiles: compilation is slow, so no deadline and a modest number of examples (a test whose
# every example compiles a model asks for fewer itself). CI draws the same examples every run; "long"
# is for a search run on purpose: HYPOTHESIS_PROFILE=long.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("ci", max_examples=30, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import kvcompile

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    kvcompile.reset()
    yield
    torch._dynamo.reset()
