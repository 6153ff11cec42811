"""GGUF read/write (llama.cpp- and bitnet.cpp-compatible), quant block codecs, model config, tokenizer."""
