"""bf16 autocast (hardware.mixed_precision=bf16 without FSDP): the tiled LM head matches plain autocast math."""

from __future__ import annotations

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.hardware import Hardware
from prefopt.logprobs import autocast_dtype, chunked_token_logps


@pytest.mark.parametrize("bias", [False, True])
def test_tiled_head_under_bf16_autocast_equals_plain_autocast(bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 9000, bias=bias)
    h = torch.randn(50, 64, requires_grad=True)
    targets, g = torch.randint(0, 9000, (50,)), torch.randn(50)

    def grads(fn):
        h.grad = None
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        (out * g).sum().backward()
        return out.detach(), h.grad.clone(), head.weight.grad.clone()

    tiled = grads(lambda: chunked_token_logps(h, head, targets, chunk_elements=1 << 14))
    plain = grads(lambda: torch.log_softmax(head(h).float(), -1).gather(-1, targets[:, None]).squeeze(-1))
    assert tiled[0].dtype == torch.float32
    torch.testing.assert_close(tiled[0], plain[0], atol=1e-5, rtol=1e-5)  # the same bf16 logits, float32 softmax
    for a, b in zip(tiled[1:], plain[1:]):  # gradients: bf16 matmuls on both sides, summed in different orders
        assert float((a - b).abs().max() / b.abs().max()) < 2e-2


def test_mixed_precision_setting():
    assert autocast_dtype(Hardware(device="cpu")) is None
    assert autocast_dtype(Hardware(device="cpu", mixed_precision="bf16")) is torch.bfloat16
    with pytest.raises(ConfigError, match="hardware.mixed_precision"):
        autocast_dtype(Hardware(device="cpu", mixed_precision="fp8"))


def test_a_bf16_run_trains_and_its_cache_key_differs(tiny_run, tmp_path):
    summary, _ = tiny_run(
        "++hardware.mixed_precision=bf16", f"reference_cache={tmp_path / 'c'}", "steps=2", run_dir=tmp_path / "bf16"
    )
    assert summary["metrics"]["train/loss"] == pytest.approx(0.6931, abs=0.05)
    tiny_run(f"reference_cache={tmp_path / 'c'}", "steps=1", run_dir=tmp_path / "fp32")
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2  # float32 values are not bf16 values
