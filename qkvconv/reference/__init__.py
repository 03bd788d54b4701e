"""qkvconv's own forward pass (no litgpt or transformers needed), layer by layer, for `verify`."""
