"""torch.compile keeps the engine's quantized linears in its graph (the ops registered as
torch.ops.tinyomni.*, with their shape functions) and computes what the eager layers do."""

from __future__ import annotations

import pytest
import torch

from tinyomni.engine import QuantLinear, kernel_path, ops
from tinyomni.engine.kernels.int4 import reference as int4_ref
from tinyomni.engine.kernels.int8 import reference as int8_ref


@pytest.mark.skipif(not ops.has_extension(), reason=f"C++ kernels unavailable: {kernel_path()}")
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_a_compiled_quantized_linear_traces_in_one_graph_and_matches_eager(kind: str) -> None:
    torch.manual_seed(0)
    ref = int4_ref if kind == "int4" else int8_ref
    weight, bias = torch.randn(40, 96), torch.randn(40)
    layer = QuantLinear(kind, *ref.quantize(weight), bias, 96, 40)
    x = torch.randn(3, 96)
    torch._dynamo.reset()
    # fullgraph: a missing or wrong fake (shape) function would break the graph here, not at run time
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
