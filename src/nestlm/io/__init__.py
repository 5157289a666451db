"""Files on disk: safetensors checkpoint folders (`nestlm.io.safetensors`) and the one tokenizer loader
(`nestlm.io.tokenizer`)."""
