"""Where a model's weights come from, one job per module: `checkpoint_dir` (a Hugging Face checkpoint
directory), `hub` (a hub model id, from the local cache or downloaded), `random_weights` (random:<size>),
`lazy` (the lazy state dict they all yield, and the names and shapes it holds) and `memory` (freed memory
back to the OS while loading). engine/loader.py puts them together (load_checkpoint)."""
