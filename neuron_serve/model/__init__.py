"""The Llama-family model: its config, RoPE, the KV cache layout, tensor-parallel layers and sharding."""
