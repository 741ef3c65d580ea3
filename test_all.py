"""
The tests of scratchlm, grouped by the file they test. Tiny models, tiny data, CPU only.
Run: python -m pytest -q test_all.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# ==== bpe.py ====
# ==== end bpe.py ====

# ==== configurator.py ====
# ==== end configurator.py ====

# ==== prepare.py ====
# ==== end prepare.py ====

# ==== model.py ====
# ==== end model.py ====

# ==== train.py ====
# ==== end train.py ====

# ==== train.py (scale) ====
# ==== end train.py (scale) ====

# ==== train.py (faults) ====
# ==== end train.py (faults) ====

# ==== bad inputs ====
# ==== end bad inputs ====

# ==== sample.py ====
# ==== end sample.py ====

# ==== chat ====
# ==== end chat ====

# ==== rlhf.py ====
# ==== end rlhf.py ====
