"""``python -m fwdllm`` = the ``fwdllm`` command (fwdllm.cli)."""
import sys

from .cli import main

sys.exit(main())
