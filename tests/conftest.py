import torch

# Tiny models: more threads only add scheduling overhead, and CI machines are shared.
torch.set_num_threads(2)
