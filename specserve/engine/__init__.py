"""The decoding algorithms in one process: pure PyTorch + transformers, no Ray, no gRPC."""
