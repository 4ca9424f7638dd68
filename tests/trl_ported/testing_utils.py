"""The helpers TRL's test files import from TRL's `tests/testing_utils.py`, written for this suite: a temporary
directory per test and skip markers for optional packages and hardware."""

import pytest
import torch
from transformers.utils import is_peft_available
from trl.import_utils import is_liger_kernel_available

try:
    import bitsandbytes  # noqa: F401

    _bitsandbytes = True
except ImportError:
    _bitsandbytes = False


class TrlTestCase:
    """Base class of TRL's test classes: `self.tmp_dir`, a fresh directory per test."""

    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


require_peft = pytest.mark.skipif(not is_peft_available(), reason="needs peft")
require_bitsandbytes = pytest.mark.skipif(not _bitsandbytes, reason="needs bitsandbytes")
require_liger_kernel = pytest.mark.skipif(not is_liger_kernel_available(), reason="needs liger-kernel")
# bitsandbytes quantisation runs on CUDA only unless its multi-backend build is installed (not a dependency here).
require_torch_gpu_if_bnb_not_multi_backend_enabled = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU for bitsandbytes"
)
