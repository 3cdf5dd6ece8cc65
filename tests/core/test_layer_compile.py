"""``torch.compile(..., fullgraph=True)`` traces a SoKA layer without graph breaks (Axolotl's
``torch_compile: true``), in both forward modes, and gives the eager values and gradients."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from axolotl_soka import SokaConfig

IN_FEATURES, OUT_FEATURES = 64, 48


class OneLinear(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def values_and_grads(module: nn.Module, x: torch.Tensor, up: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    trainable = [p for p in module.parameters() if p.requires_grad]
    for param in trainable:
        param.grad = None
    out = module(x)
    (out * up).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in trainable]


@pytest.mark.slow
@pytest.mark.parametrize("forward_mode", ["factored", "dense"])
def test_fullgraph_compile_matches_eager(forward_mode):
    """A biased layer on 3-d input (the factored forward flattens it); the Llama test below has no biases."""
    torch.manual_seed(0)
    config = SokaConfig(target_modules=["proj"], rank_pattern={"proj": 3}, forward_mode=forward_mode)
    model = get_peft_model(OneLinear(bias=True), config).double()
    module = model.base_model.model  # the adapted module itself; PeftModel's own wrapper is PEFT's code
    layer = module.proj
    with torch.no_grad():  # move the factors off their initial values so that every gradient is non-trivial
        for param in layer.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 600, IN_FEATURES, generator=g, dtype=torch.float64)  # enough tokens for dense to pay
    up = torch.randn(2, 600, OUT_FEATURES, generator=g, dtype=torch.float64)
    if forward_mode == "dense":
        assert layer._dense_adapter(x) == "default"
    want = values_and_grads(module, x, up)
    torch._dynamo.reset()
    got = values_and_grads(torch.compile(module, fullgraph=True), x, up)
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("forward_mode", ["factored", "dense"])
def test_a_llama_with_soka_compiles_to_one_graph(forward_mode):
    """A whole (tiny) Llama with SoKA on attention and MLP projections: one graph, no breaks, and the
    compiled loss equals the eager one."""
    from tiny_models import TINY_LLAMA
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = SokaConfig(
        target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={".*": 2}, forward_mode=forward_mode
    )
    module = get_peft_model(LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)), config).base_model.model
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 300), generator=torch.Generator().manual_seed(1))
    want = module(input_ids=ids, labels=ids).loss
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(input_ids=ids, labels=ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    torch._dynamo.reset()
    got = torch.compile(module, fullgraph=True)(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
