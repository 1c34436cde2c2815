"""The engine: models, prompts, LoRAs and generation, run one at a time. It knows nothing of HTTP."""

import os

# transformers logs, when diffusers first imports it, that torchvision is missing; Imagine never uses what
# needs it, and the notice would only confuse a user. The variable must be set before that import.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The same for diffusers' notices (safety checker disabled, dtype casts): nothing actionable for a server's user.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
