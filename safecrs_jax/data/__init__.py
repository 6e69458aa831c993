"""Data plumbing between the benchmark and the model: tokenizers, chat templates,
length buckets, and the cached assets a run builds (data, tokenizer)."""
