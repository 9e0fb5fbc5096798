"""`python -m train.export ADAPTER --to merged|gguf|ollama`: see train/export/__init__.py."""

import sys

from train.export import main

sys.exit(main())
