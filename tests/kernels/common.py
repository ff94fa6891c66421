"""What the kernel tests share: where the default tests run, and the mark of the GPU tests."""

import pytest
import torch

from ftune.kernels.utils import INTERPRET

# The default tests run on CPU under the interpreter, or compiled on the GPU when there is one
DEVICE = "cpu" if INTERPRET else "cuda"


def gpu(test):
    """Larger shapes and every dtype, compiled: `pytest -m gpu` on a CUDA machine."""
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA, without the interpreter")
    return pytest.mark.gpu(skip(test))
