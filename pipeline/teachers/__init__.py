"""Teacher backends (vllm, hf): token rows in, one TopK batch type out."""
