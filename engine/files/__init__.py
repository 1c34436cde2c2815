"""Reading the files people download: .safetensors and GGUF headers, recognising and loading each part of a model
(diffusion models, text encoders, VAEs, scaled fp8 weights, GGUF quantized weights), the model families and how a
file shows its own, and the models folders. No HTTP, no generation."""
