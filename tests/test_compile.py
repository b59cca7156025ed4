"""torch.compile gives the eager model's results: inference logits and training gradients.

Two levels. ``aot_eager`` (seconds): TorchDynamo captures the whole forward in one graph (``fullgraph=True``,
so a graph break in the model fails here) and AOTAutograd derives the backward, which is the path
``torch.compile`` training takes. ``inductor`` (the default backend the benchmark uses): generated C++ kernels
for inference; on a cold cache its first compile builds C++ headers and kernels with gcc, which took 11 min
for this tiny model on the two (shared, loaded) cores here, so it runs only with ``LVIT_SLOW_TESTS=1``.

**Not CI evidence.** CI runs ``python -m pytest -q`` without ``LVIT_SLOW_TESTS``, so the inductor test is
skipped there, and no claim in README.md, docs/ or bench/RESULTS.md rests on it. What does check inductor is
``lvit bench`` when a run includes a ``compile`` variant (not ``--quick``, not a ``--variants`` list without
it): each compile variant is compared with eager fp32 (logits and one step's gradients) and not kept if it
breaks the bound; the result is the "max rel err (bound)" column of its table. The current CPU speed table has
no compile row, and the GPU run's compile row broke the strict fp32 bound (2.5e-4 vs 1e-4, TF32 on both sides;
docs/PERFORMANCE.md). Run this test by hand (``LVIT_SLOW_TESTS=1 python -m pytest tests/test_compile.py``)
after changing the model's forward.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from lvit.artifacts.export import example_inputs
from lvit.models import LViTConfig, build_model

TINY = LViTConfig(image_size=32, base_channels=8, text_dim=16, vit_heads=2, dropout=0.0)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lvit", TINY)


def _grads(model, compiled, inputs, target):
    model.zero_grad(set_to_none=True)
    loss = F.binary_cross_entropy_with_logits(compiled(*inputs), target)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.slow  # ~60 s of CPU: Dynamo + AOTAutograd trace every module of the net (forward and backward)
@pytest.mark.timeout(900)
def test_compiled_model_matches_eager_in_inference_and_training():
    torch._dynamo.reset()
    model = _model()
    inputs = example_inputs(2, 32, 3, 10, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    with torch.no_grad():
        expected, got = model(*inputs), compiled(*inputs)
    assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max())
    model.train()
    target = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    ref_loss, ref_grads = _grads(model, model, inputs, target)
    loss, grads = _grads(model, compiled, inputs, target)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert float((grads - ref_grads).norm() / ref_grads.norm()) < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("LVIT_SLOW_TESTS") != "1",
                    reason="manual check, not run in CI: a cold inductor compile takes minutes of gcc on 2 cores; "
                           "set LVIT_SLOW_TESTS=1")
def test_inductor_inference_matches_eager():
    torch._dynamo.reset()
    model = _model().eval()
    inputs = example_inputs(2, 32, 3, 10, 16)
    compiled = torch.compile(model)  # inductor, as `lvit bench` measures it
    with torch.no_grad():
        expected, got = model(*inputs), compiled(*inputs)
        # A new batch size reuses or recompiles the graph; results must still match.
        inputs3 = example_inputs(3, 32, 3, 10, 16, seed=3)
        expected3, got3 = model(*inputs3), compiled(*inputs3)
    for e, g in ((expected, got), (expected3, got3)):
        assert float((g - e).abs().max()) <= 1e-4 * float(e.abs().max())
