"""all-MiniLM-L6-v2's BERT encoder written as an ONNX graph from its weights (see :mod:`importer.model`).

Kept apart from the model folder's contract so that loading the model (every search) never imports onnx.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: ONNX opset 17 is the first with LayerNormalization; every onnxruntime since 1.14 runs it.
OPSET = 17
#: onnxruntime's contrib operators (fused attention, layer norms, GELU); every onnxruntime build has them.
CONTRIB_DOMAIN = "com.microsoft"


class _GraphBuilder:
    """Collects ONNX nodes and initializers, naming intermediate values uniquely."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._counter = 0
        self._constants: set[str] = set()

    def op(self, op_type: str, *inputs: str, domain: str = "", **attributes: Any) -> str:
        (output,) = self.op_outputs(op_type, *inputs, outputs=1, domain=domain, **attributes)
        return output

    def op_outputs(self, op_type: str, *inputs: str, outputs: int, domain: str = "", **attributes: Any) -> list[str]:
        self._counter += 1
        names = [f"{op_type.lower()}_{self._counter}" + (f"_{n}" if n else "") for n in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain or None, **attributes))
        return names

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer; asking again for the same name reuses the first one."""
        if name not in self._constants:
            self._constants.add(name)
            self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, name: str, *, transpose: bool = False) -> str:
        """A checkpoint tensor as an initializer; PyTorch Linear weights are stored (out, in)."""
        value = np.ascontiguousarray(self.weights[name].T if transpose else self.weights[name], dtype=np.float32)
        return self.const(name, value)

    def linear(self, x: str, prefix: str) -> str:
        product = self.op("MatMul", x, self.weight(f"{prefix}.weight", transpose=True))
        return self.op("Add", product, self.weight(f"{prefix}.bias"))

    def layer_norm(self, x: str, prefix: str, epsilon: float) -> str:
        scale, bias = self.weight(f"{prefix}.weight"), self.weight(f"{prefix}.bias")
        return self.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=epsilon)


def build_bert_onnx(config: dict[str, Any], weights: dict[str, np.ndarray], *, fused: bool = True) -> onnx.ModelProto:
    """The BERT encoder described by ``config`` with ``weights``, as an ONNX model.

    Inputs are ``(batch, sequence)`` int64 tensors; the output ``last_hidden_state`` is
    ``(batch, sequence, hidden)`` float32, exactly what fastembed's pooling expects.

    ``fused`` (the default, what :func:`prepare_model` writes) emits onnxruntime's fused transformer
    operators (EmbedLayerNormalization, Attention, SkipLayerNormalization, BiasGelu) instead of the
    standard operators they replace; onnxruntime's own optimizer does not recognise this hand-built
    graph, and unfused it spends a third of its time in element-wise Add/Mul/Softmax/Transpose.
    ``fused=False`` builds the same network from standard ONNX operators only: the reference the
    tests compare against, and a graph any ONNX runtime can run.
    """
    if config.get("model_type") != "bert" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only BERT models with absolute position embeddings are supported")
    if config["hidden_act"] != "gelu":
        raise ValueError(f"unsupported activation {config['hidden_act']!r}")
    graph = _GraphBuilder(weights)
    epsilon = float(config["layer_norm_eps"])
    layers = range(int(config["num_hidden_layers"]))
    if fused:
        hidden, lengths = _fused_embeddings(graph, epsilon)
        for index in layers:
            hidden = _fused_encoder_layer(graph, hidden, lengths, f"encoder.layer.{index}", config)
    else:
        hidden = _embeddings(graph, epsilon)
        additive_mask = _attention_mask(graph)
        for index in layers:
            hidden = _encoder_layer(graph, hidden, additive_mask, f"encoder.layer.{index}", config)
    graph.nodes.append(helper.make_node("Identity", [hidden], ["last_hidden_state"]))

    dims = ["batch", "sequence"]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, dims)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*dims, int(config["hidden_size"])])
    onnx_graph = helper.make_graph(graph.nodes, "bert", inputs, [output], graph.initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    if fused:
        opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="reflection-operator")
    model.ir_version = 8  # readable by every onnxruntime that supports opset 17
    onnx.checker.check_model(model)
    return model


def _embeddings(graph: _GraphBuilder, epsilon: float) -> str:
    """Word + position + token-type embeddings, then LayerNorm."""
    words = graph.op("Gather", graph.weight("embeddings.word_embeddings.weight"), "input_ids")
    token_types = graph.op("Gather", graph.weight("embeddings.token_type_embeddings.weight"), "token_type_ids")
    # Positions 0..sequence-1, computed from the input's shape so any length up to 512 works.
    sequence_length = graph.op(
        "Gather", graph.op("Shape", "input_ids"), graph.const("const_axis_1", np.array(1, dtype=np.int64))
    )
    positions = graph.op(
        "Range",
        graph.const("const_zero_i64", np.array(0, dtype=np.int64)),
        sequence_length,
        graph.const("const_one_i64", np.array(1, dtype=np.int64)),
    )
    # (sequence, hidden) broadcasts over the batch axis when added.
    position_vectors = graph.op("Gather", graph.weight("embeddings.position_embeddings.weight"), positions)
    summed = graph.op("Add", graph.op("Add", words, token_types), position_vectors)
    return graph.layer_norm(summed, "embeddings.LayerNorm", epsilon)


def _attention_mask(graph: _GraphBuilder) -> str:
    """``(batch, 1, 1, sequence)``: 0 for real tokens, a large negative number for padding.

    Added to the attention scores before softmax, so padding gets no weight, as in transformers.
    """
    as_float = graph.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    inverted = graph.op("Sub", graph.const("const_one_f32", np.array(1.0, dtype=np.float32)), as_float)
    lowest = np.array(np.finfo(np.float32).min, dtype=np.float32)
    scaled = graph.op("Mul", inverted, graph.const("const_mask_value", lowest))
    return graph.op("Unsqueeze", scaled, graph.const("const_mask_axes", np.array([1, 2], dtype=np.int64)))


def _encoder_layer(graph: _GraphBuilder, hidden: str, additive_mask: str, prefix: str, config: dict[str, Any]) -> str:
    epsilon = float(config["layer_norm_eps"])
    attended = _self_attention(graph, hidden, additive_mask, prefix, config)
    projected = graph.linear(attended, f"{prefix}.attention.output.dense")
    hidden = graph.layer_norm(graph.op("Add", projected, hidden), f"{prefix}.attention.output.LayerNorm", epsilon)
    intermediate = _gelu(graph, graph.linear(hidden, f"{prefix}.intermediate.dense"))
    output = graph.linear(intermediate, f"{prefix}.output.dense")
    return graph.layer_norm(graph.op("Add", output, hidden), f"{prefix}.output.LayerNorm", epsilon)


def _self_attention(graph: _GraphBuilder, hidden: str, additive_mask: str, prefix: str, config: dict[str, Any]) -> str:
    heads = int(config["num_attention_heads"])
    head_size = int(config["hidden_size"]) // heads
    # Reshape (batch, sequence, hidden) → (batch, sequence, heads, head_size); 0 keeps a dimension.
    split_shape = graph.const(f"{prefix}.split_shape", np.array([0, 0, heads, head_size], dtype=np.int64))

    def heads_of(name: str, perm: list[int]) -> str:
        projected = graph.linear(hidden, f"{prefix}.attention.self.{name}")
        return graph.op("Transpose", graph.op("Reshape", projected, split_shape), perm=perm)

    query = heads_of("query", [0, 2, 1, 3])  # (batch, heads, sequence, head_size)
    key = heads_of("key", [0, 2, 3, 1])  # (batch, heads, head_size, sequence)
    value = heads_of("value", [0, 2, 1, 3])
    scale = graph.const(f"{prefix}.scale", np.array(1.0 / math.sqrt(head_size), dtype=np.float32))
    scores = graph.op("Add", graph.op("Mul", graph.op("MatMul", query, key), scale), additive_mask)
    context = graph.op("MatMul", graph.op("Softmax", scores, axis=-1), value)
    merged = graph.op("Transpose", context, perm=[0, 2, 1, 3])
    merge_shape = graph.const(f"{prefix}.merge_shape", np.array([0, 0, heads * head_size], dtype=np.int64))
    return graph.op("Reshape", merged, merge_shape)


def _gelu(graph: _GraphBuilder, x: str) -> str:
    """Exact (erf) GELU, as BERT's ``gelu``: 0.5·x·(1 + erf(x/√2)); onnxruntime fuses the pattern."""
    inv_sqrt2 = graph.const("const_inv_sqrt2", np.array(1.0 / math.sqrt(2.0), dtype=np.float32))
    one = graph.const("const_one_f32", np.array(1.0, dtype=np.float32))
    half = graph.const("const_half", np.array(0.5, dtype=np.float32))
    erf = graph.op("Erf", graph.op("Mul", x, inv_sqrt2))
    return graph.op("Mul", graph.op("Mul", x, half), graph.op("Add", erf, one))


# -- the fused graph: onnxruntime's contrib operators (domain com.microsoft) --------------------------


def _fused_embeddings(graph: _GraphBuilder, epsilon: float) -> tuple[str, str]:
    """Word + position + token-type embeddings and their LayerNorm in one EmbedLayerNormalization.

    Its second output, each text's token count (the mask must be right-padded, as the tokenizer
    pads), is the ``mask_index`` every Attention node takes.
    """
    as_int32 = {
        name: graph.op("Cast", name, to=TensorProto.INT32) for name in ("input_ids", "token_type_ids", "attention_mask")
    }
    embedded, lengths = graph.op_outputs(
        "EmbedLayerNormalization",
        as_int32["input_ids"],
        as_int32["token_type_ids"],
        graph.weight("embeddings.word_embeddings.weight"),
        graph.weight("embeddings.position_embeddings.weight"),
        graph.weight("embeddings.token_type_embeddings.weight"),
        graph.weight("embeddings.LayerNorm.weight"),
        graph.weight("embeddings.LayerNorm.bias"),
        as_int32["attention_mask"],
        outputs=2,
        domain=CONTRIB_DOMAIN,
        epsilon=epsilon,
    )
    return embedded, lengths


def _fused_encoder_layer(graph: _GraphBuilder, hidden: str, lengths: str, prefix: str, config: dict[str, Any]) -> str:
    epsilon = float(config["layer_norm_eps"])
    attention = f"{prefix}.attention.self"
    # Attention takes Q, K and V as one (hidden, 3·hidden) matrix and one bias, in that order.
    names = [f"{attention}.{part}" for part in ("query", "key", "value")]
    qkv_weight = np.concatenate([graph.weights[f"{name}.weight"].T for name in names], axis=1)
    qkv_bias = np.concatenate([graph.weights[f"{name}.bias"] for name in names])
    attended = graph.op(
        "Attention",
        hidden,
        graph.const(f"{attention}.qkv.weight", np.ascontiguousarray(qkv_weight, dtype=np.float32)),
        graph.const(f"{attention}.qkv.bias", qkv_bias.astype(np.float32)),
        lengths,
        domain=CONTRIB_DOMAIN,
        num_heads=int(config["num_attention_heads"]),
    )
    hidden = _skip_layer_norm(graph, attended, hidden, f"{prefix}.attention.output", epsilon)
    intermediate = graph.op(
        "BiasGelu",  # exact (erf) GELU of x + bias
        graph.op("MatMul", hidden, graph.weight(f"{prefix}.intermediate.dense.weight", transpose=True)),
        graph.weight(f"{prefix}.intermediate.dense.bias"),
        domain=CONTRIB_DOMAIN,
    )
    return _skip_layer_norm(graph, intermediate, hidden, f"{prefix}.output", epsilon)


def _skip_layer_norm(graph: _GraphBuilder, x: str, residual: str, prefix: str, epsilon: float) -> str:
    """LayerNorm(x·W + bias + residual): the dense projection's bias and the residual add, fused."""
    projected = graph.op("MatMul", x, graph.weight(f"{prefix}.dense.weight", transpose=True))
    return graph.op(
        "SkipLayerNormalization",
        projected,
        residual,
        graph.weight(f"{prefix}.LayerNorm.weight"),
        graph.weight(f"{prefix}.LayerNorm.bias"),
        graph.weight(f"{prefix}.dense.bias"),
        domain=CONTRIB_DOMAIN,
        epsilon=epsilon,
    )
