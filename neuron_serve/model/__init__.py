"""The Llama-family model: its config, RoPE, the KV cache, the tensor-parallel context and sharding."""
