"""Decoding: prefill and cached decode (generate), and budget control: think with a small nested submodel,
answer with a large one (two_phase)."""
