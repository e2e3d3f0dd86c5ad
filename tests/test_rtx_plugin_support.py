"""Why `build --moe plugin --backend tensorrt-rtx` is refused: TensorRT-RTX 1.7 cannot build any plugin layer.

A minimal IPluginV3 identity plugin (Python, no GPU code, so no header or kernel question) registers fine and the
ONNX parser creates it, then the process aborts while the layer is added. If a TensorRT-RTX release builds it, this
test fails: lift the refusal in engines/pipeline.check_moe_backend and update README-facts.md.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("tensorrt_rtx")

IDENTITY_PLUGIN_BUILD = r'''
import onnx
import tensorrt_rtx as trt
from onnx import TensorProto, helper


class Identity(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
    def __init__(self):
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        self.plugin_name, self.plugin_version, self.plugin_namespace, self.num_outputs = "NucleusIdentity", "1", "", 1

    def get_capability_interface(self, kind): return self
    def clone(self): return Identity()
    def get_output_data_types(self, types): return [types[0]]
    def get_output_shapes(self, inputs, shape_inputs, builder): return [inputs[0]]
    def configure_plugin(self, inputs, outputs): pass
    def supports_format_combination(self, pos, io, num_inputs):
        return io[pos].desc.type == trt.float32 and io[pos].desc.format == trt.TensorFormat.LINEAR
    def on_shape_change(self, inputs, outputs): pass
    def enqueue(self, *args): raise RuntimeError("not run")
    def attach_to_context(self, context): return self.clone()
    def get_fields_to_serialize(self): return trt.PluginFieldCollection([])
    def set_tactic(self, tactic): pass
    def get_valid_tactics(self): return []


class Creator(trt.IPluginCreatorV3One):
    def __init__(self):
        trt.IPluginCreatorV3One.__init__(self)
        self.name, self.plugin_namespace, self.plugin_version = "NucleusIdentity", "", "1"
        self.field_names = trt.PluginFieldCollection([])

    def create_plugin(self, name, fields, phase): return Identity()


creator = Creator()
assert trt.get_plugin_registry().register_creator(creator, "")
node = helper.make_node("NucleusIdentity", ["x"], ["y"], domain="custom", name="identity")
graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("custom", 1)])
logger = trt.Logger(trt.Logger.INFO)
builder = trt.Builder(logger)
network = builder.create_network(0)
parser = trt.OnnxParser(network, logger)
assert parser.parse(model.SerializeToString())
assert builder.build_serialized_network(network, builder.create_builder_config()) is not None
print("BUILT")
'''


def test_tensorrt_rtx_cannot_add_a_plugin_layer():
    import tensorrt_rtx

    assert not any("plugin" in name for name in dir(tensorrt_rtx.INetworkDefinition))  # no add_plugin_v2/v3
    result = subprocess.run([sys.executable, "-c", IDENTITY_PLUGIN_BUILD], check=False, capture_output=True,
                            text=True, timeout=300)
    assert "Successfully created plugin: NucleusIdentity" in result.stdout + result.stderr  # the creator is found and used
    assert result.returncode != 0 and "BUILT" not in result.stdout
    assert "terminate called" in result.stderr
