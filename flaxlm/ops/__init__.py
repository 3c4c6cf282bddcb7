"""flaxlm.ops."""
