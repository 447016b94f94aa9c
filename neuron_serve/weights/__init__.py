"""Where weights come from: Hugging Face directories, GGUF files, S3, the default model, the tiny test model."""
