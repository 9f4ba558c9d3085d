"""ONNX Runtime and OpenVINO as providers: both run the ONNX ``RNN`` operator on the case's nn.RNN weights.

The graph is one ``RNN`` node per layer, built here from nn.RNN's state_dict, in ONNX's layouts:
    W [D, H, I_l] = weight_ih_l{k}(_reverse), R [D, H, H] = weight_hh_l{k}(_reverse),
    B [D, 2H] = (bias_ih, bias_hh), initial_h [D, B, H] = h0[k*D:(k+1)*D]   (D = 2 if bidirectional)
    Y [T, D, B, H] -> [T, B, D*H] (Squeeze, or Transpose + Reshape when D = 2): the next layer's input and
    the output; Y_h of every layer concatenated -> h_n [L*D, B, H], nn.RNN's order (layer-major).
The layout changes are part of the peer's timed work, as they are part of nn.RNN's and ours.

What the operator covers is what runs: layers, bidirectional, tanh and relu, fp32 on the CPU, forward only
(ONNX has no training graph for RNN; train mode is skipped with that reason). Packed input is skipped: the
node's ``sequence_lens`` pads instead of packing, so its output would need a repacking step that nn.RNN and
ours do not pay.

Threads: the run's torch thread count, pinned through each runtime's public options: ONNX Runtime's
SessionOptions (intra_op_num_threads = N, inter_op_num_threads = 1, sequential execution), OpenVINO's
compile config (INFERENCE_NUM_THREADS = N, NUM_STREAMS = 1, LATENCY hint, INFERENCE_PRECISION_HINT = f32:
on CPUs with bf16 support OpenVINO would otherwise compute in bf16, a different problem).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from .cases import Case
from .providers import Provider
from .workload import CallResult, Workload

OPSET = 14
INSTALL_HINT = "pip install -e .[peers]"


def missing(*modules: str) -> str | None:
    """The reason a peer cannot run for lack of a module, None when all are importable."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed: {INSTALL_HINT}" if absent else None


def onnx_unsupported(case: Case) -> str | None:
    """Why the ONNX RNN operator cannot stand in for this case, None if it can."""
    if case.mode != "forward":
        return "forward only: the ONNX RNN operator has no training graph"
    if case.device != "cpu" or case.dtype != "float32":
        return "CPU fp32 peer"
    if case.packed:
        return "packed input: the ONNX RNN node pads (sequence_lens) instead of packing"
    return None


def rnn_model(case: Case, state: dict[str, torch.Tensor]):
    """The ONNX ModelProto of ``case`` with nn.RNN's weights ``state``; inputs X [T, B, I] and h0_l{k}."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    H, D = case.H, 2 if case.bidirectional else 1
    suffixes = ["", "_reverse"][:D]
    activation = {"tanh": "Tanh", "relu": "Relu"}[case.nonlinearity]

    def stacked(name, k):
        return np.stack([state[f"{name}_l{k}{s}"].detach().cpu().numpy() for s in suffixes])

    nodes, inits, h0_inputs, y_h = [], [], [], []
    x = "X"
    for k in range(case.num_layers):
        inits += [numpy_helper.from_array(stacked("weight_ih", k), f"W{k}"),
                  numpy_helper.from_array(stacked("weight_hh", k), f"R{k}"),
                  numpy_helper.from_array(np.concatenate([stacked("bias_ih", k), stacked("bias_hh", k)], 1), f"B{k}")]
        h0_inputs.append(helper.make_tensor_value_info(f"h0_l{k}", TensorProto.FLOAT, [D, "B", H]))
        nodes.append(helper.make_node("RNN", [x, f"W{k}", f"R{k}", f"B{k}", "", f"h0_l{k}"], [f"Y{k}", f"Y_h{k}"],
                                      hidden_size=H, activations=[activation] * D,
                                      direction="bidirectional" if D == 2 else "forward"))
        x = f"out{k}"
        if D == 1:  # [T, 1, B, H] -> [T, B, H]
            nodes.append(helper.make_node("Squeeze", [f"Y{k}", "axis1"], [x]))
        else:  # [T, 2, B, H] -> [T, B, 2, H] -> [T, B, 2H]
            nodes += [helper.make_node("Transpose", [f"Y{k}"], [f"Yt{k}"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"Yt{k}", "merge_dirs"], [x])]
        y_h.append(f"Y_h{k}")
    # The shape constants of whichever layout change the graph uses (an unused initializer draws a warning).
    inits.append(numpy_helper.from_array(np.array([1], np.int64) if D == 1 else np.array([0, 0, -1], np.int64),
                                         "axis1" if D == 1 else "merge_dirs"))
    nodes.append(helper.make_node("Concat", y_h, ["h_n"], axis=0) if len(y_h) > 1
                 else helper.make_node("Identity", y_h, ["h_n"]))
    nodes.append(helper.make_node("Identity", [x], ["output"]))
    graph = helper.make_graph(
        nodes, "rnn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", case.I]), *h0_inputs],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["T", "B", D * H]),
         helper.make_tensor_value_info("h_n", TensorProto.FLOAT, [case.num_layers * D, "B", H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def ort_session(model, threads: int):
    """An ONNX Runtime CPU session of ``model`` pinned to ``threads`` intra-op threads, one inter-op thread,
    sequential execution (the run's thread count, as every provider)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def feeds(workload: Workload) -> dict[str, np.ndarray]:
    """The graph's inputs as numpy, made once outside the timed call (contiguous copies)."""
    D = 2 if workload.case.bidirectional else 1
    h0 = workload.h0.detach().cpu().numpy()
    return {"X": np.ascontiguousarray(workload.x.detach().cpu().numpy()),
            **{f"h0_l{k}": np.ascontiguousarray(h0[k * D:(k + 1) * D]) for k in range(workload.case.num_layers)}}


def _as_tensors(out: np.ndarray, h_n: np.ndarray) -> dict[str, torch.Tensor]:
    """The graph's outputs by the gate's names (after the clock: workload.CallResult)."""
    return {"output": torch.from_numpy(out), "h_n": torch.from_numpy(h_n)}


class OnnxRuntime(Provider):
    name = "onnxruntime"

    def label(self, device: str) -> str:
        return "ONNX Runtime, ONNX RNN operator (CPU EP)"

    def unavailable(self, case: Case) -> str | None:
        return missing("onnx", "onnxruntime") or onnx_unsupported(case)

    def make_call(self, workload: Workload):
        session = ort_session(rnn_model(workload.case, workload.baseline.state_dict()), torch.get_num_threads())
        inputs = feeds(workload)

        def call():
            return CallResult(_as_tensors, *session.run(["output", "h_n"], inputs))
        return call


class OpenVINO(Provider):
    name = "openvino"

    def label(self, device: str) -> str:
        return "OpenVINO, ONNX RNN operator (CPU plugin)"

    def unavailable(self, case: Case) -> str | None:
        return missing("onnx", "openvino") or onnx_unsupported(case)

    def make_call(self, workload: Workload):
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        core = ov.Core()
        model = core.read_model(rnn_model(workload.case, workload.baseline.state_dict()).SerializeToString())
        config = {props.inference_num_threads: torch.get_num_threads(), props.num_streams: 1,
                  hints.performance_mode: hints.PerformanceMode.LATENCY, hints.inference_precision: ov.Type.f32}
        request = core.compile_model(model, "CPU", config).create_infer_request()
        inputs = feeds(workload)

        def call():
            results = request.infer(inputs)
            return CallResult(_as_tensors, results["output"], results["h_n"])
        return call


__all__ = ["OnnxRuntime", "OpenVINO", "feeds", "missing", "onnx_unsupported", "rnn_model"]
