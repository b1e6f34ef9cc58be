"""feddat-secure: federated finetuning of a vision-language model with FedDAT.

The package never downloads anything: the Hugging Face libraries are put in offline mode
before they are imported (a value the user already set is honoured, and every load passes
``local_files_only=True`` regardless).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

__version__ = "0.1.0"
