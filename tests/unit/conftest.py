"""Unit tests are pure: no services. One torch thread keeps them fast and steady on a shared 2-core machine."""

import torch

torch.set_num_threads(1)
