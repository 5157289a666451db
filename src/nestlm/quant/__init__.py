"""FP8 and NVFP4 quantization of nestlm models: fake quantization for PTQ and quantization-aware
distillation (QAD), calibration, and packed checkpoints in the ModelOpt layout that vLLM loads.

    import nestlm.quant as q
    q.fake_quantize_(model, "nvfp4")               # weights read as q(w); gradients pass straight through
    amax = q.calibrate(model, batches)              # activation amax per quantized weight (input_scale)
    q.export_quantized(model, "out", "nvfp4", input_amax=amax)
    q.slice_quantized("out", "out_75", "75%")       # a budget of a packed elastic checkpoint, by index ranges
    model = q.load_quantized("out")                 # dequantized Decoder, for CPU evaluation
    q.quantize("elastic_dir", "out", "nvfp4")       # all of the above for a checkpoint folder

Modules: formats (the number formats, pure functions), fake (which weights, parametrization, width checks,
calibration), packed (the ModelOpt layout: packing, packed slicing, configs, unpacking), export (writing
packed folders, `nestlm quantize`), load (reading them back).
"""

from nestlm.quant.export import export_quantized, quantize, slice_quantized
from nestlm.quant.fake import (
    CALIB_INPUTS,
    FUSED,
    QUANTIZED,
    calibrate,
    check_elastic,
    check_subarch,
    fake_quant_disabled,
    fake_quantize_,
    is_fake_quantized,
    latent_state_dict,
    quantized_weights,
    remove_fake_quant_,
    weight_scales,
)
from nestlm.quant.formats import FORMATS, Format, get_format
from nestlm.quant.load import load_quantized, quantized_bytes
from nestlm.quant.packed import dequantize_state, pack_weights, quant_configs

__all__ = [
    "CALIB_INPUTS", "FORMATS", "FUSED", "QUANTIZED", "Format", "calibrate", "check_elastic", "check_subarch",
    "dequantize_state", "export_quantized", "fake_quant_disabled", "fake_quantize_", "get_format",
    "is_fake_quantized", "latent_state_dict", "load_quantized", "pack_weights", "quant_configs", "quantize",
    "quantized_bytes", "quantized_weights", "remove_fake_quant_", "slice_quantized", "weight_scales",
]
