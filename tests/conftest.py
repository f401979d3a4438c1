import os

import torch

# Two cores on the reference machine: keep test processes from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
