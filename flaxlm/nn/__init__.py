"""flaxlm.nn."""
