"""Test settings: one CPU thread (tiny models run faster single-threaded, and results are repeatable)."""

import torch

torch.set_num_threads(1)
