"""Inference: serving an elastic checkpoint (`serve`: an OpenAI-compatible API where every budget is a model,
with think-small / answer-large as request fields) and budget control across any two OpenAI-compatible
endpoints (`client`)."""
