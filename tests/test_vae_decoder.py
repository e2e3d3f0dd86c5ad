"""The vae_decoder graph against diffusers' AutoencoderKLQwenImage: random VAEs of the real class (saved with
save_pretrained), exported through export.write_graph, run in ONNX Runtime on the CPU, built with TensorRT-RTX."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import pytest
from nucleus_runtime.contract import IMAGE, LATENTS, VAE_DECODER_GRAPH

from nucleus_export.errors import NucleusExportError
from nucleus_export.export import write_graph
from nucleus_export.graph.builder import GraphBuilder
from nucleus_export.graph.external_data import CheckpointLinks, load_model
from nucleus_export.graph.layers import LayerEmitter
from nucleus_export.graph.precision import GraphPrecision, QuantRecipe
from nucleus_export.costs.vae_decoder import vae_decoder_cost
from nucleus_export.graph.vae_decoder import DECODED, FORMS, build_vae_decoder, postprocess
from nucleus_export.model.vae import (
    QWEN_IMAGE_VAE,
    VaeConfig,
    decoder_parameter_shapes,
    open_vae,
    write_random_vae,
)

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

CONFIGS = {
    # the toy pipeline's VAE (tests/toy_pipeline.py): 8x, 16 latent channels, narrow
    "toy-8x": VaeConfig(base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    # diffusers' own QwenImage pipeline test dummy: 4x, 4 latent channels
    "dummy-4x": VaeConfig(base_dim=24, z_dim=4, dim_mult=(1, 2, 4), num_res_blocks=1, temperal_downsample=(False, True),
                          latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4),
    # temporal upsampling on the other block, two residual blocks, odd widths, encoder attention (decoder: none)
    "mixed-4x": VaeConfig(base_dim=6, z_dim=4, dim_mult=(1, 3, 2), num_res_blocks=2, attn_scales=(1.0, 0.5),
                          temperal_downsample=(True, False), latents_mean=(0.3, -0.2, 0.1, 0.5),
                          latents_std=(1.7, 0.8, 2.2, 1.1)),
}
LATENT_SIZES = [(6, 10), (8, 8)]  # one non-square; image sizes follow from each VAE's scale factor
BATCH = 2


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    return {name: write_random_vae(root / name, config, seed=i) for i, (name, config) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def references(vae_dirs):
    """diffusers' AutoencoderKLQwenImage loaded back from each saved folder."""
    from diffusers import AutoencoderKLQwenImage

    return {name: AutoencoderKLQwenImage.from_pretrained(path).eval() for name, path in vae_dirs.items()}


def _latents(config: VaeConfig, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, config.z_dim, *size), dtype=np.float32)


def _pipeline_decode(vae, latents: np.ndarray):
    """The tail of NucleusMoEImagePipeline.__call__ up to the image processor, on [B, z, h, w] unpacked latents."""
    z_dim = vae.config.z_dim
    x = torch.from_numpy(latents)[:, :, None]
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(x / latents_std + latents_mean, return_dict=False)[0][:, :, 0]


def _pipeline_pil(vae, decoded) -> np.ndarray:
    """The pipeline's image processor, output_type "pil", as a [B, H, W, 3] uint8 array."""
    from diffusers.image_processor import VaeImageProcessor

    scale = 2 ** len(vae.temperal_downsample)
    images = VaeImageProcessor(vae_scale_factor=scale * 2).postprocess(decoded, output_type="pil")
    return np.stack([np.asarray(image) for image in images])


def _export(vae_dir, out_dir, form: str, compute: str = "fp32", float_output: bool = True, external: bool = True):
    """The graph as an exporter writes it: export.write_graph over the VAE's decoder weights."""
    vae = open_vae(vae_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_graph(out_dir, VAE_DECODER_GRAPH, vae.weights, GraphPrecision(compute),
                lambda g, emit: build_vae_decoder(g, emit, vae.config, form, float_output=float_output),
                external=external, links=CheckpointLinks(out_dir) if external else None)
    return out_dir / f"{VAE_DECODER_GRAPH}.onnx"


def _session(model_or_path):
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(vae_dirs, tmp_path_factory):
    """fp32 graphs with the float output, per (config, form)."""
    root = tmp_path_factory.mktemp("graphs")
    return {(name, form): _export(path, root / f"{name}-{form}", form) for name, path in vae_dirs.items() for form in FORMS}


@pytest.fixture(scope="module")
def outputs(exported, references):
    """(decoded, image) of the graph and diffusers' decoded for every config, form and latent size."""
    results = {}
    for (name, form), path in exported.items():
        session = _session(path)
        for size in LATENT_SIZES:
            latents = _latents(CONFIGS[name], size)
            decoded, image = session.run([DECODED, IMAGE], {LATENTS: latents})
            results[name, form, size] = (decoded, image, _pipeline_decode(references[name], latents))
    return results


# ---- config and checkpoint ----------------------------------------------------------------------------------------


def test_config_defaults_are_diffusers_and_the_released_vae():
    import inspect

    from diffusers import AutoencoderKLQwenImage

    signature = inspect.signature(AutoencoderKLQwenImage.__init__)
    for field, value in QWEN_IMAGE_VAE.to_dict().items():
        assert signature.parameters[field].default == value, field
    assert QWEN_IMAGE_VAE.scale_factor == 8
    assert CONFIGS["dummy-4x"].scale_factor == 4
    assert sum(math.prod(s) for s in decoder_parameter_shapes(QWEN_IMAGE_VAE).values()) == 73_295_603


@pytest.mark.parametrize("config", [QWEN_IMAGE_VAE, *CONFIGS.values()], ids=["released", *CONFIGS])
def test_decoder_layout_is_diffusers(config):
    from diffusers import AutoencoderKLQwenImage

    with torch.device("meta"):
        model = AutoencoderKLQwenImage(**config.to_dict())
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items() if n.startswith(("decoder.", "post_quant_conv."))}
    assert decoder_parameter_shapes(config) == expected


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_name": "AutoencoderKLWan"}, "not AutoencoderKLQwenImage"),
        ({"scaling_factor": 0.5}, "fields AutoencoderKLQwenImage does not take: scaling_factor"),
        ({"temperal_downsample": [False, True]}, "2 entries for 4 dim_mult levels"),
        ({"input_channels": 4}, "RGB"),
        ({"latents_std": [1.0] * 15}, "latents_std needs 16 finite numbers"),
        ({"latents_std": [0.0] * 16}, "cannot be de-normalized"),
        ({"dim_mult": []}, "non-empty list"),
        ({"dim_mult": 4}, "malformed field"),
    ],
)
def test_config_refusals(change, message):
    raw = {"_class_name": "AutoencoderKLQwenImage", **QWEN_IMAGE_VAE.to_dict(), **change}
    with pytest.raises(NucleusExportError, match=message):
        VaeConfig.from_dict(raw)


def test_open_vae_reads_headers_of_the_decoder_only(vae_dirs, tmp_path):
    vae = open_vae(vae_dirs["toy-8x"])
    assert vae.config == CONFIGS["toy-8x"]
    assert set(vae.weights) == set(decoder_parameter_shapes(vae.config))  # the encoder's tensors are left out
    root = tmp_path / "pipeline"
    shutil.copytree(vae_dirs["toy-8x"], root / "vae")
    (root / "model_index.json").write_text("{}")
    assert open_vae(root).vae_dir == root / "vae"
    config_path = root / "vae" / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "num_res_blocks": 2}))
    with pytest.raises(NucleusExportError, match="do not match its config.json: 24 missing"):  # a third resnet x 4
        open_vae(root)
    config_path.write_text(json.dumps({**saved, "base_dim": 16}))
    with pytest.raises(NucleusExportError, match=r"do not match its config.json: \d+ of another shape"):
        open_vae(root)
    (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(NucleusExportError, match="holds no diffusion_pytorch_model.safetensors"):
        open_vae(root)


def test_fp8_is_refused(vae_dirs):
    vae = open_vae(vae_dirs["toy-8x"])
    g = GraphBuilder(VAE_DECODER_GRAPH)
    with pytest.raises(NucleusExportError, match="FP8 is not offered for the VAE decoder"):
        build_vae_decoder(g, LayerEmitter(g, vae.weights, GraphPrecision("bf16", QuantRecipe({}))), vae.config)


# ---- parity with diffusers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", CONFIGS)
def test_float_image_matches_diffusers_decode(outputs, name, form):
    scale = CONFIGS[name].scale_factor
    for size in LATENT_SIZES:
        decoded, _, reference = outputs[name, form, size]
        assert decoded.shape == (BATCH, 3, size[0] * scale, size[1] * scale)
        reference = reference.numpy()
        assert 0.05 < reference.std() and np.abs(reference).max() < 1  # a real image range, not saturated
        assert np.abs(decoded - reference).max() <= 1e-5 * np.abs(reference).max()


@pytest.mark.parametrize("name", CONFIGS)
def test_forms_agree(outputs, name):
    for size in LATENT_SIZES:
        decoded_2d, image_2d, _ = outputs[name, "2d", size]
        decoded_3d, image_3d, _ = outputs[name, "3d", size]
        # float32 rounding apart, not bit for bit: the 3D kernels also sum their zero taps, in another order
        assert np.abs(decoded_2d - decoded_3d).max() <= 1e-5 * np.abs(decoded_2d).max()
        assert np.abs(image_2d.astype(int) - image_3d.astype(int)).max() <= 1


def test_postprocess_is_the_pipelines_exactly(outputs, references):
    """The post-processing subgraph on diffusers' own decoded floats gives the pipeline's PIL pixels bit for bit."""
    g = GraphBuilder("postprocess")
    postprocess(g, g.input(DECODED, onnx.TensorProto.FLOAT, ["batch", 3, "height", "width"]))
    session = _session(g.make_model("test"))
    for (name, form, _), (_, _, reference) in outputs.items():
        if form == "2d":
            (image,) = session.run(None, {DECODED: reference.numpy()})
            np.testing.assert_array_equal(image, _pipeline_pil(references[name], reference))
    ties = np.array([[-1.0, 1 / 255 - 1, 2 / 255 - 1, 0.5 / 255 * 2 - 1, 1.5 / 255 * 2 - 1, 2.5 / 255 * 2 - 1]], np.float32)
    ties = np.broadcast_to(ties.reshape(1, 1, 1, -1), (1, 3, 1, ties.size)).copy()
    (image,) = session.run(None, {DECODED: ties})
    np.testing.assert_array_equal(image, _pipeline_pil(references["toy-8x"], torch.from_numpy(ties)))


@pytest.mark.parametrize("name", CONFIGS)
def test_uint8_image_matches_the_pipeline(outputs, references, name):
    """The graph's pixels are the pipeline's except where diffusers' value x * 255 lies within the graph's float error
    of a rounding boundary (k + 0.5): there they differ by one step, in a handful of pixels."""
    for size in LATENT_SIZES:
        decoded, image, reference = outputs[name, "2d", size]
        expected = _pipeline_pil(references[name], reference)
        differ = image != expected
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
        assert differ.mean() <= 1e-3
        scaled = (np.clip(reference.numpy() * 0.5 + 0.5, 0, 1) * 255).transpose(0, 2, 3, 1)
        error = np.abs(decoded - reference.numpy()).max() * 255 / 2
        assert np.all(np.abs(scaled[differ] % 1 - 0.5) <= error)


def test_bf16_graph_emulated_on_cpu_stays_close(vae_dirs, references, tmp_path):
    from nucleus_export.rewrites.bf16_emulation import emulate_bf16_in_fp32

    name = "toy-8x"
    path = _export(vae_dirs[name], tmp_path / "bf16", "2d", compute="bf16")
    model = onnx.load(str(path), load_external_data=False)
    assert {i.data_type for i in model.graph.initializer if "conv" in i.name and i.name.endswith("weight.last_frame")} == {
        onnx.TensorProto.BFLOAT16
    }
    latents = _latents(CONFIGS[name], LATENT_SIZES[0])
    decoded, _ = _session(emulate_bf16_in_fp32(load_model(path))).run([DECODED, IMAGE], {LATENTS: latents})
    reference = _pipeline_decode(references[name], latents)
    assert np.abs(decoded - reference.numpy()).max() <= 3e-2


# ---- TensorRT-RTX ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_bf16_graph_builds_with_tensorrt_rtx(vae_dirs, tmp_path, form):
    pytest.importorskip("tensorrt_rtx")
    from nucleus_export.engines.flavors import resolve_flavor
    from nucleus_export.engines.loaders import BuildSettings, EngineFromOnnx, NetworkFromOnnxPath

    name = "toy-8x"
    z = CONFIGS[name].z_dim
    path = _export(vae_dirs[name], tmp_path, form, compute="bf16", float_output=False)
    shapes = {LATENTS: ((1, z, 4, 4), (1, z, 8, 8), (BATCH, z, 8, 12))}
    report = EngineFromOnnx(NetworkFromOnnxPath(resolve_flavor("tensorrt-rtx"), path), BuildSettings(shapes),
                            tmp_path / "vae_decoder.plan", graph=VAE_DECODER_GRAPH)()
    network = report.network
    assert report.engine_bytes > 0
    assert network.outputs == {IMAGE: "UINT8"}
    assert set(network.precision_per_layer_type["CONVOLUTION"]) == {"BF16"}
    assert network.precision_per_layer_type["SOFTMAX"] == {"FLOAT": 1}
    assert set(network.precision_per_layer_type["MATRIX_MULTIPLY"]) == {"BF16"}


# ---- cost -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_cost_counts_what_diffusers_multiplies(references, name):
    """Convolution multiply-adds counted with hooks on diffusers' modules during a real decode: every Conv2d, and
    for the causal Conv3d the taps that meet data (the last temporal slice) or all of them (the "3d" form)."""
    vae, config = references[name], CONFIGS[name]
    counted = {"data": 0.0, "all": 0.0, "attention": 0.0}

    def hook(module, inputs, output):
        kernel = math.prod(module.kernel_size)
        last_slice = kernel // module.kernel_size[0] if isinstance(module, torch.nn.Conv3d) else kernel
        macs = 2.0 * output.numel() * module.in_channels
        if ".attentions." in module.path:
            counted["attention"] += macs * kernel
        else:
            counted["data"] += macs * last_slice
            counted["all"] += macs * kernel

    handles = []
    for path, module in vae.named_modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Conv3d) and path.startswith(("decoder.", "post_quant_conv")):
            module.path = path
            handles.append(module.register_forward_hook(hook))
    size = LATENT_SIZES[0]
    try:
        _pipeline_decode(vae, _latents(config, size))
    finally:
        for handle in handles:
            handle.remove()
    height, width = size[0] * config.scale_factor, size[1] * config.scale_factor
    cost_2d = vae_decoder_cost(config, height, width, batch=BATCH)
    cost_3d = vae_decoder_cost(config, height, width, batch=BATCH, form="3d")
    tokens = size[0] * size[1]
    products = 4.0 * BATCH * tokens * tokens * config.mid_dim
    assert cost_2d.conv_flops == counted["data"]
    assert cost_3d.conv_flops == counted["all"]
    assert cost_2d.attention_flops == counted["attention"] + products


@pytest.mark.parametrize("form", FORMS)
def test_cost_weight_bytes_are_the_graphs(vae_dirs, form):
    vae = open_vae(vae_dirs["mixed-4x"])
    g = GraphBuilder(VAE_DECODER_GRAPH)
    build_vae_decoder(g, LayerEmitter(g, vae.weights, GraphPrecision("bf16")), vae.config, form)
    stored = sum(len(t.raw_data) for t in g.initializers if not t.name.startswith("const_"))
    assert vae_decoder_cost(vae.config, 32, 32, form=form).weight_bytes == stored


def test_cost_refuses_sizes_off_the_latent_grid():
    with pytest.raises(NucleusExportError, match="multiple of the VAE's scale factor 8"):
        vae_decoder_cost(QWEN_IMAGE_VAE, 1020, 1024)
