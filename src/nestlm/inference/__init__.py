"""Inference: decoding (`generate`: prefill and cached decode), budget control (`two_phase`: think with a
small nested submodel, answer with a large one), serving an elastic checkpoint (`serve`: an OpenAI-compatible
API where every budget is a model, think-small / answer-large as request fields), and budget control across
any two OpenAI-compatible endpoints (`client`)."""
