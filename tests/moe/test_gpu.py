"""CUDA paths (grouped GEMM in bf16). Skipped cleanly on machines without a GPU (CI)."""

import pytest
import torch

from conftest import loop_oracle
from xmoe import MoE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_cuda_bf16_autocast_matches_fp32_oracle(backend):
    torch.manual_seed(0)
    moe = MoE(64, 8, 32, router="threshold", threshold=0.8, backend=backend).cuda()
    x = torch.randn(256, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = moe(x)
    r = moe.last_routing
    assert r.weight.dtype == torch.float32
    expected = loop_oracle(x, r.token_idx, r.expert_idx, r.weight, moe.experts)
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=5e-2)
