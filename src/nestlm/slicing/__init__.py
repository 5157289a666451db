"""Zero-shot slicing: an elastic checkpoint + a budget -> a plain Hugging Face checkpoint, streamed.

    nestlm.slicing.slice("out/elastic", "77%", "out/77")        # a manifest budget, by name
    nestlm.slicing.slice("out/elastic", 0.6, "out/60")           # a fraction: trained, or interpolated
    nestlm.slicing.slice("path/hf", SubArch(hidden=448), "out")  # any folder, any explicit SubArch

    nestlm.slicing.export_quantized(model, "out/nvfp4", "nvfp4")  # a model as a packed FP8 / NVFP4 folder

Modules: plan (which bytes of which source tensor make each output tensor), packed (the same for a packed
FP8 / NVFP4 folder, and the packed writer of a model), write (the streamed writer, plain and packed).
"""

from nestlm.slicing.packed import export_quantized
from nestlm.slicing.plan import OutTensor, Piece, plan
from nestlm.slicing.write import slice_checkpoint, slice_quantized

slice = slice_checkpoint  # the public name; inside the package, `slice` stays the builtin

__all__ = ["OutTensor", "Piece", "export_quantized", "plan", "slice", "slice_checkpoint", "slice_quantized"]
