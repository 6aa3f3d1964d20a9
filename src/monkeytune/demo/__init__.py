"""The embedded demo: a synthetic high-resolution VQA task that shows why tiling and per-window LoRA matter."""
