"""qwen-runner: CPU inference for giant Qwen Mixture-of-Experts models.

Importing the package must stay cheap and must not import torch: threads are
configured (``qwen_runner.threads``) before torch is first imported.
"""

__version__ = "0.1.0"
