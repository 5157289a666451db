"""Zero-shot slicing: an elastic checkpoint + a budget -> a plain Hugging Face checkpoint, streamed.

    nestlm.slicing.slice("out/elastic", "77%", "out/77")        # a manifest budget, by name
    nestlm.slicing.slice("out/elastic", 0.6, "out/60")           # a fraction: trained, or interpolated
    nestlm.slicing.slice("path/hf", SubArch(hidden=448), "out")  # any folder, any explicit SubArch

Modules: plan (which bytes of which source tensor make each output tensor), packed (the same for a packed
FP8 / NVFP4 folder), write (the streamed writer, plain and packed).
"""

from nestlm.slicing.plan import OutTensor, Piece, open_source, plan
from nestlm.slicing.write import slice_checkpoint

slice = slice_checkpoint  # the public name; inside the package, `slice` stays the builtin

__all__ = ["OutTensor", "Piece", "open_source", "plan", "slice", "slice_checkpoint"]
