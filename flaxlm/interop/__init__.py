"""flaxlm.interop."""
