"""FP8 and NVFP4 quantization primitives: the number formats, fake quantization for PTQ and quantization-aware
distillation (QAD), calibration, and the ModelOpt packed layout (which vLLM loads). Pure: nestlm.quant
imports only the model, never elastic, slicing or loading (DESIGN.md: the bottom layer).

    import nestlm.quant as q
    q.fake_quantize_(model, "nvfp4")               # weights read as q(w); gradients pass straight through
    amax = q.calibrate(model, batches)              # activation amax per quantized weight (input_scale)

Modules: formats (the number formats, pure functions), fake (which weights, parametrization, width checks,
calibration), packed (the ModelOpt layout: packing, configs, unpacking). Built on them, above:
nestlm.slicing.packed (export_quantized: the packed writer; packed cuts), nestlm.slicing.slice_quantized
(a budget of a packed folder), nestlm.quantize (`nestlm quantize`), nestlm.load (reading packed folders:
from_hf dequantizes them), nestlm.info.quantized_bytes.
"""

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
from nestlm.quant.packed import dequantize_state, pack_weights, quant_configs

__all__ = [
    "CALIB_INPUTS", "FORMATS", "FUSED", "QUANTIZED", "Format", "calibrate", "check_elastic", "check_subarch",
    "dequantize_state", "fake_quant_disabled", "fake_quantize_", "get_format", "is_fake_quantized",
    "latent_state_dict", "pack_weights", "quant_configs", "quantized_weights", "remove_fake_quant_",
    "weight_scales",
]
