"""pronghorn: fast, exact LoRA fine-tuning of Llama-family models."""
